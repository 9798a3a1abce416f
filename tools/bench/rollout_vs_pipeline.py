"""Benchmark (a): our ``rollout()`` against diffusers' ``WanPipeline.__call__`` on the same weights.

Both sides get the same transformer object, the same prompt embeddings (the pipeline through
``prompt_embeds`` / ``negative_prompt_embeds``; our rollout's text cache is warm after the warm-up
run, so neither side runs the text encoder in a timed run), the same initial noise, the same
number of steps, CFG with guidance 4.5 and the same video size.

Two pairs:

* latent: ``rollout(decode=False)`` vs ``WanPipeline(output_type="latent")``: no VAE on either side;
* decoded: ``rollout(decode=True)`` vs ``WanPipeline(output_type="np")``: both decode with the same VAE.

Ours runs with ``sampler.cfg_batch: auto``: on the CPU cond and uncond go through the transformer
as two calls of ``B`` rows, as the pipeline does (on a GPU, as one call of ``2B``); the extra
variant ``ours_latent_joint`` forces the one-call form. Legitimate differences, kept: our rollout makes ``SDE_STEPS`` of
the steps stochastic policy steps and stores ``x``, ``x'``, ``mu`` for them (what training needs),
the pipeline takes deterministic Euler steps with its own (shifted) sigma schedule.

Verdict: the median of the per-repeat ratios (ours / pipeline, each pair run back to back, so a
slow drift of the machine's load moves both alike) against the target, reported with a
distribution-free interval for that median (order statistics; ``benchmarking.median_interval``). The
ratio of the medians and of the minima are kept beside it as checks.

    .venv/bin/python tools/bench/rollout_vs_pipeline.py --repeats 5 --out /tmp/a.json
    .venv/bin/python tools/bench/rollout_vs_pipeline.py --smoke --no-memory --out /tmp/a.json   # does it run?
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch; see _common.py

from pathlib import Path
from typing import Any, Callable

import torch

import _common as C  # this folder's shared setup (the script's folder is on sys.path)

from flowdppo_video.commands import benchmarking as B

TARGET = 1.05
MALLOC: dict[str, int] = {}     # mallopt settings when run with --malloc-tuned
PAIRS = [("latent: rollout(decode=False) / WanPipeline(output_type='latent')", "ours_latent", "pipeline_latent"),
         ("decoded: rollout(decode=True) / WanPipeline(output_type='np')", "ours_decoded", "pipeline_decoded")]
# Extra, informational: the same latent pair with sampler.cfg_batch=joint ([cond; uncond] as one
# transformer call of 2B rows, the GPU default).
EXTRA = ("latent, sampler.cfg_batch=joint: rollout / WanPipeline(output_type='latent')", "ours_latent_joint",
         "pipeline_latent")


def build(device: torch.device) -> tuple[Any, dict[str, Callable[[], Any]]]:
    """The model (its adapter), both samplers, and one closure per variant."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from flowdppo_video.runs.config import SamplerConfig
    from flowdppo_video.models.wan import WanAdapter
    from flowdppo_video.training.rollout import rollout

    adapter = WanAdapter.from_config(C.WAN_INIT, device=device, max_sequence_length=C.MAX_SEQUENCE_LENGTH, seed=0)
    adapter.transformer.requires_grad_(False)
    latent_shape = adapter.latent_shape(C.VIDEO["num_frames"], C.VIDEO["height"], C.VIDEO["width"])
    sampler = SamplerConfig(**C.sampler_dict())
    prompts = [C.PROMPT]
    b = len(prompts) * C.GROUP_SIZE
    text = adapter.encode_prompts([p for p in prompts for _ in range(C.GROUP_SIZE)])
    text_u = adapter.encode_prompts([""] * b)
    # The pipeline is made of the adapter's own modules: the very same weights.
    pipe = WanPipeline(tokenizer=adapter.tokenizer, text_encoder=adapter.text_encoder, vae=adapter.vae,
                       transformer=adapter.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=C.SHIFT))
    pipe.set_progress_bar_config(disable=True)
    seed = 0
    # rollout() draws its initial noise first from a generator seeded `seed`: give the pipeline the same.
    noise = torch.randn((b, *latent_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)

    sampler_joint = SamplerConfig(**{**C.sampler_dict(), "cfg_batch": "joint"})

    def ours(decode: bool, smp: SamplerConfig = sampler) -> Callable[[], Any]:
        return lambda: rollout(adapter, prompts, C.GROUP_SIZE, latent_shape, smp,
                               torch.Generator().manual_seed(seed), negative_prompt="", progress=False,
                               decode=decode)

    def theirs(output_type: str) -> Callable[[], Any]:
        return lambda: pipe(prompt_embeds=text, negative_prompt_embeds=text_u, height=C.VIDEO["height"],
                            width=C.VIDEO["width"], num_frames=C.VIDEO["num_frames"],
                            num_inference_steps=C.NUM_STEPS, guidance_scale=C.GUIDANCE,
                            latents=noise.clone().to(device), output_type=output_type,
                            max_sequence_length=C.MAX_SEQUENCE_LENGTH, return_dict=False)

    with torch.no_grad():
        # Sanity: one transformer call on the pipeline's inputs equals our velocity on the same rows.
        x = noise[:1].to(device)
        v_ours = adapter.velocity(x, torch.tensor([0.5], device=device), text[:1])
        v_pipe = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0], device=device),
                                  encoder_hidden_states=text[:1], return_dict=False)[0]
        assert torch.equal(v_ours, v_pipe.float()), "the pipeline does not hold the adapter's transformer"
    variants = {"ours_latent": ours(False), "pipeline_latent": theirs("latent"),
                "ours_latent_joint": ours(False, sampler_joint),
                "ours_decoded": ours(True), "pipeline_decoded": theirs("np"),
                # Warm-up of the VAE before the decoded pair (the transformer is warm from the latent pair).
                "_vae_warmup": lambda: adapter.decode(noise)}
    return adapter, variants


def run(repeats: int = 5, out: Path | None = None, device: str = "cpu", memory: bool = True,
        decoded: bool = True, extra: bool = True, profile: str = "on-miss",
        argv: list[str] | None = None) -> dict[str, Any]:
    C.setup_torch()
    dev = C.torch_device(device)
    machine = B.machine_info(dev)
    print(f"(a) rollout vs WanPipeline: building the model on {dev} ...", flush=True)
    adapter, variants = build(dev)
    pairs = PAIRS if decoded else PAIRS[:1]
    names = [n for _, o, t in pairs for n in (o, t)]       # these also get a peak-memory probe
    groups = [[o, t] for _, o, t in pairs]
    if extra:   # timed interleaved with the latent pair: one group of three
        groups[0].append(EXTRA[1])
    times: dict[str, list[float]] = {}
    extra_stats: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for i, group in enumerate(groups):
            if i == 0:
                print(f" timing {' vs '.join(group)} (1 warm-up each, then {repeats} interleaved repeats)",
                      flush=True)
                t, f = B.time_interleaved({n: variants[n] for n in group}, repeats, dev)
            else:
                print(f" timing {' vs '.join(group)} (warm: the runs above and one VAE decode; then {repeats} "
                      "interleaved repeats)", flush=True)
                variants["_vae_warmup"]()
                t, f = B.time_interleaved({n: variants[n] for n in group}, repeats, dev, warmup=0)
            times.update(t)
            extra_stats.update(f)
    timed = (times, extra_stats)
    prof = None
    lat_ratio = B.median([a / b for a, b in zip(times["ours_latent"], times["pipeline_latent"])])
    if profile == "always" or (profile == "on-miss" and lat_ratio > TARGET):
        print(f" latent ratio {lat_ratio:.3f}x: profiling ours_latent vs pipeline_latent (1 run each)", flush=True)
        with torch.no_grad():
            prof = B.profile_ops(variants, ["ours_latent", "pipeline_latent"], rounds=1)
        for row in prof["top"][:8]:
            print(f"  {row['op']:<52} ours {row['ours_latent_ms']:8.1f} ms  pipeline {row['pipeline_latent_ms']:8.1f} ms"
                  f"  diff {row['diff_ms']:+8.1f} ms")
    mem: dict[str, dict[str, Any]] = {}
    if memory:
        print(" peak memory, each variant once in a fresh process", flush=True)
        for n in names:
            mem[n] = C.probe_in_subprocess(Path(__file__), n,
                                           ["--device", device, *(["--malloc-tuned"] if MALLOC else [])])
    latent, tokens = C.latent_and_tokens(adapter)
    config = {"model_init": C.WAN_INIT, "video": C.VIDEO, "latent": latent, "tokens": tokens, "smoke": C.SMOKE,
              "batch_videos": C.GROUP_SIZE, "rows_per_forward_ours": C.GROUP_SIZE if dev.type == "cpu" else 2 * C.GROUP_SIZE,
              "rows_per_forward_pipeline": C.GROUP_SIZE, "num_steps": C.NUM_STEPS, "sde_steps": C.SDE_STEPS,
              "guidance_scale": C.GUIDANCE, "text_tokens": C.MAX_SEQUENCE_LENGTH, "dtype": "float32"}
    note = ("Same transformer object, same prompt embeddings, same initial noise, same steps, CFG 4.5. "
            "Ours uses sampler.cfg_batch=auto: on the CPU two forwards of B (cond, uncond), as the pipeline. "
            "Ours also stores x, x', mu for its SDE steps. The 'latent' pair has no VAE on either side, the "
            "'decoded' pair decodes with the same VAE on both sides. ours_latent_joint is the latent rollout with "
            "sampler.cfg_batch=joint (one forward of 2B rows, the GPU default), timed in the same interleaved group.")
    if MALLOC:
        config["malloc"] = MALLOC
    config["warmup"] = ("latent group: 1 untimed run per variant; decoded pair: none of its own, it follows the "
                        "latent group (transformer warm) after one untimed VAE decode")
    result = B.make_result("rollout_vs_pipeline", "(a) rollout() vs diffusers WanPipeline.__call__",
                           argv or C.command_line(), repeats, machine, timed, mem,
                           [(lbl, o, t, TARGET) for lbl, o, t in pairs + ([EXTRA] if extra else [])],
                           config, note, verdict_on="paired_ratio_median")
    result["profile"] = prof
    B.summarize(result)
    B.write_json(out, result)
    return result


def probe(variant: str, device: str, out: Path | None) -> None:
    C.setup_torch()
    dev = C.torch_device(device)
    _, variants = build(dev)
    with torch.no_grad():
        data = B.peak_memory_of(variants[variant], dev)
    B.write_json(out, data)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--no-decoded", action="store_true", help="only the latent pair (no VAE decoding)")
    p.add_argument("--no-extra", action="store_true", help="skip the sampler.cfg_batch=joint variant")
    p.add_argument("--malloc-tuned", action="store_true",
                   help="diagnostic: glibc malloc keeps freed memory (see flowdppo_video.commands.benchmarking.tune_malloc)")
    p.add_argument("--profile", choices=["on-miss", "always", "never"], default="on-miss",
                   help="torch.profiler breakdown of the latent pair (default: when it misses the target)")
    a = C.parse_args(p, argv)
    if a.malloc_tuned:
        MALLOC.update(B.tune_malloc())
    if a.memory_probe:
        probe(a.memory_probe, a.device, a.out)
        return None
    return run(a.repeats, a.out, a.device, memory=not a.no_memory, decoded=not a.no_decoded,
               extra=not a.no_extra, profile=a.profile)


if __name__ == "__main__":
    main()
