"""The entry points: the CLI (``cli``: ``flowdppo-video`` and ``python -m flowdppo_video``),
``python -m flowdppo_video.commands.train`` for launchers (``train``), ``sample``, ``serve``
(the reward server), ``scoring`` (``score``), ``planner`` (``plan``), and what the benchmark scripts
under ``tools/bench/`` share (``benchmarking``).

The top layer: nothing in the package imports it."""
