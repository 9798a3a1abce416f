"""What a run is read back as: the HTML report (``report``, with the shared ``html`` parts), the
end-of-run summary (``run_summary``), before/after videos (``before_after``), checkpoints compared
on held-out prompts (``eval_checkpoints``), win rates (``winrates``), curves (``plots``), and what a
run writes as it goes (``run_artifacts``).

Imports ``training`` and below; never the ``trainer`` or ``commands``."""
