"""Layer 8 of 9, running studies: workers that claim a point, train it and record its outcome
(``worker``), worker processes on one machine (``supervise``), creating or resuming a study
(``study``) and the final evaluation's trainings (``evaluate``). Imports every layer below."""
