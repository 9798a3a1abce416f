"""The algorithm's parts: the run builder (a config or a run directory to a ready adapter,
``run_builder``), the rollout (``rollout``), the policy update (``policy_update``), evaluation and its
artifact monitors (``evaluation``, ``monitors``), checkpoints (``checkpoint``), metrics and
throughput (``metrics``, ``perf``), per-token KL maps (``kl_maps``).

Imports ``runs``, ``models``, ``parallel`` and the math; never ``reporting``, the ``trainer`` or
``commands``. ``flowdppo_video.trainer`` drives these parts."""
