"""What a run reads and writes: the config (``config``), the prompts and conditioning images
(``data``, ``images``, ``resources``), the run directory and its lock (``run_dir``), atomic writes
and one-line OS errors (``fsio``), seeds and the device (``seeding``), video files (``video``).

Imports the pure math and ``exceptions`` only (and ``rewards`` to validate the reward specs)."""
