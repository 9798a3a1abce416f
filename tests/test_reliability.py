"""Faults and bad inputs (issue 17): each is one line naming the key, path or file, exit 2, and
nothing written before is lost. The table of what these tests try is in docs/reliability.md."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdppo_video.runs.config import ConfigError, load_config, load_yaml
from flowdppo_video.trainer import Trainer, TrainingError

from .conftest import ROOT, TINY_CONFIG, cli, tiny_config

QUIET = ["run.sample_every=100", "run.num_sample_videos=0"]


# ---------------------------------------------------------------- config: checked before anything
@pytest.mark.parametrize("override, expected", [
    ("sampler.eta=.nan", "sampler.eta must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("rewards={frame_change: .nan}", "rewards.frame_change must be a finite number, got nan"),
    ("rewards={frame_change: {weight: -.inf}}", "rewards.frame_change.weight must be a finite number, got -inf"),
    ("sampler.window=[0.0, .nan]", "sampler.window[1] must be a finite number, got nan"),
    ("model.init={transformer: {eps: .nan}}", "model.init.transformer.eps must be a finite number"),
    ("optim.betas=[2, 3]", "optim.betas must be two numbers in [0, 1), got [2.0, 3.0]"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.eps=-1e-8", "optim.eps must be > 0, got -1e-08"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("video.height=0", "video.height must be >= 1, got 0"),
    ("video.width=-32", "video.width must be >= 1, got -32"),
    ("video.num_frames=0", "video.num_frames must be >= 1, got 0"),
])
def test_config_values_are_checked_and_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_CONFIG, [override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_base_cycle_or_self_include_is_one_line(tmp_path):
    me = tmp_path / "me.yaml"
    me.write_text("base: me.yaml\nrun: {iterations: 1}\n")
    with pytest.raises(ConfigError, match=r"base includes form a cycle: .*me.yaml -> .*me.yaml$"):
        load_yaml(me)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: sub/c.yaml\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a.yaml -> .*b.yaml -> .*c.yaml -> .*a.yaml$"):
        load_yaml(tmp_path / "a.yaml")
    # a diamond (two files sharing a base) is no cycle
    (tmp_path / "d.yaml").write_text("base: sub/e.yaml\nrun: {seed: 3}\n")
    (tmp_path / "sub" / "e.yaml").write_text("run: {iterations: 4}\n")
    assert load_yaml(tmp_path / "d.yaml") == {"run": {"seed": 3, "iterations": 4}}
    (tmp_path / "f.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"f.yaml: base .*nowhere.yaml does not exist"):
        load_yaml(tmp_path / "f.yaml")


def test_a_yaml_syntax_error_keeps_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  iterations: 2\n  seed: [1, 2\noptim: {lr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(bad)
    msg = str(e.value)
    assert msg.startswith(f"config file {bad} is not valid YAML: line 4, column ") and "\n" not in msg
    with pytest.raises(ConfigError, match=r"override 'run.seed=\{1': the value is not valid YAML \(line 1, column"):
        load_config(TINY_CONFIG, ["run.seed={1"])


def test_output_dir_under_a_file_is_refused_before_anything(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    cfg = tiny_config(tmp_path, f"run.output_dir={blocker / 'run'}")
    with pytest.raises(ConfigError, match=r"run.output_dir .*afile/run is under .*afile, which is a file"):
        Trainer(cfg)
    cfg = tiny_config(tmp_path, f"run.output_dir={blocker}")
    with pytest.raises(ConfigError, match=r"run.output_dir .*afile is a file, not a folder"):
        Trainer(cfg)
    assert blocker.read_text() == "not a folder"


def test_a_size_the_model_cannot_take_fails_before_the_run_directory_exists(tmp_path):
    cfg = tiny_config(tmp_path, "video.height=36")
    with pytest.raises(Exception, match=r"video size 36x32 must be divisible by 16x16"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny 2-iteration run with checkpoints iter_000001 and iter_000002 (copied per test)."""
    root = tmp_path_factory.mktemp("finished")
    Trainer(tiny_config(root, "run.iterations=2", *QUIET)).run()
    return root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _resume(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(tiny_config(tmp_path, "run.iterations=3", *QUIET, *overrides), resume=True)


def test_resume_to_fewer_iterations_than_done_is_refused_and_changes_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match=r"run.iterations=1 is below the 2 iterations already done "
                                            r"\(iter_000002\); give run.iterations >= 2"):
        _resume(tmp_path, "run.iterations=1")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before   # config.yaml too


@pytest.mark.parametrize("damage", ["model/pytorch_lora_weights.safetensors", "state.pt", "meta.json",
                                    "optimizer.pt"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, capsys, damage):
    run = _copy(finished_run, tmp_path)
    f = run / "checkpoints" / "iter_000002" / damage
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])       # truncated, as by a full disk
    trainer = _resume(tmp_path)
    assert trainer.start_iteration == 1
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "skipped checkpoint" in ln]
    assert len(warned) == 1 and f"skipped checkpoint iter_000002 ({damage} has" in warned[0]
    assert "resuming from iter_000001" in warned[0]
    aside = run / "checkpoints" / "corrupt_iter_000002"
    assert (aside / damage).is_file() and not (run / "checkpoints" / "iter_000002").exists()  # kept, not deleted
    assert [r["iteration"] for r in trainer.run()] == [1, 2]


def test_a_checkpoint_without_manifest_is_tried_by_loading(finished_run, tmp_path, capsys):
    """Checkpoints written before manifests: the newest that loads is taken."""
    run = _copy(finished_run, tmp_path)
    for m in run.glob("checkpoints/*/manifest.json"):
        m.unlink()
    f = run / "checkpoints" / "iter_000002" / "model" / "pytorch_lora_weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert _resume(tmp_path).start_iteration == 1
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "skipped checkpoint" in ln]
    assert len(warned) == 1 and "skipped checkpoint iter_000002 (SafetensorError" in warned[0]
    assert (run / "checkpoints" / "corrupt_iter_000002").is_dir()


def test_when_no_checkpoint_verifies_nothing_is_moved(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    for name in ("iter_000001", "iter_000002"):
        (run / "checkpoints" / name / "state.pt").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match=r"no checkpoint verifies or loads \(newest iter_000002: state.pt has 7 "
                                            r"bytes, .*nothing was moved"):
        _resume(tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]


# ---------------------------------------------------------------- seeds
def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_run_seed_seeds_the_global_generators(tmp_path):
    Trainer(tiny_config(tmp_path / "a", "run.seed=5"))
    a = _draws()
    Trainer(tiny_config(tmp_path / "b", "run.seed=5"))
    assert _draws() == a
    Trainer(tiny_config(tmp_path / "c", "run.seed=6"))
    assert all(x != y for x, y in zip(_draws(), a))


def test_a_reward_drawing_random_numbers_resumes_exactly(tmp_path):
    """The checkpoint restores the global generators: 1 + resume 1 equals 2 straight."""
    import rewards

    @rewards.register("test_noisy_reward")
    class Noisy:
        def __call__(self, videos, prompts, *, fps):
            return torch.rand(len(prompts)) + float(np.random.rand()) + random.random()

    try:
        over = ["rewards={test_noisy_reward: 1.0}", *QUIET]
        straight = Trainer(tiny_config(tmp_path / "a", "run.iterations=2", *over)).run()
        Trainer(tiny_config(tmp_path / "b", "run.iterations=1", *over)).run()
        random.seed(99), np.random.seed(99), torch.manual_seed(99)      # whatever ran in between
        resumed = Trainer(tiny_config(tmp_path / "b", "run.iterations=2", *over), resume=True).run()
        assert resumed[0]["reward/mean"] == straight[1]["reward/mean"]
    finally:
        rewards.REWARDS.pop("test_noisy_reward")


# ---------------------------------------------------------------- NaN is never hidden
def test_nonfinite_videos_are_counted_and_named(tmp_path, monkeypatch, capsys):
    from flowdppo_video import trainer as trainer_mod

    real = trainer_mod.rollout

    def nan_first(*a, **k):
        traj = real(*a, **k)
        traj.final[0] = float("nan")
        return traj

    monkeypatch.setattr(trainer_mod, "rollout", nan_first)
    row = Trainer(tiny_config(tmp_path, "run.iterations=1", *QUIET)).run()[0]
    assert row["videos/nonfinite"] == 1
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["videos/nonfinite"] == 1
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "non-finite latents" in ln]
    assert warned == ["flowdppo-video: warning: iteration 0: 1 of 4 videos have non-finite latents "
                      "(decoded as black frames); counted in videos/nonfinite"]


# ---------------------------------------------------------------- disk full, read-only (root: a tmpfs)
@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped otherwise), unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_during_a_checkpoint_keeps_the_previous(small_disk, tmp_path):
    from flowdppo_video.training.checkpoint import (
        CheckpointError, list_checkpoints, save_checkpoint, verify_checkpoint)

    cfg = tiny_config(small_disk, "run.iterations=1", *QUIET, "run.keep_checkpoints=5")
    trainer = Trainer(cfg)
    trainer.run()
    run = small_disk / "run"
    _fill(small_disk)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*iter_000002: no space left on the "
                                              r"device \(\d+ bytes free\); the previous checkpoints are kept"):
        save_checkpoint(run, trainer.adapter, trainer.updater, 2, {}, keep=5)
    assert [p.name for p in list_checkpoints(run)] == ["iter_000001"]
    assert verify_checkpoint(run / "checkpoints" / "iter_000001") is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001"]   # no partial left


def _cli(*args: str) -> subprocess.CompletedProcess:
    return cli(*args, check=False)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith("flowdppo-video: error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_cli_disk_full_and_read_only_are_one_line(small_disk):
    run = small_disk / "run"
    proc = _cli("train", "--config", str(TINY_CONFIG), f"run.output_dir={run}", "run.iterations=1",
                "run.tensorboard=false", "run.report_every=0", *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        line = _one_line(_cli("train", "--resume", str(run), "run.iterations=2"))
        assert str(run) in line and "not writable" in line
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    filler = _fill(small_disk)
    line = _one_line(_cli("train", "--resume", str(run), "run.iterations=2"))
    assert str(run) in line and ("No space left" in line or "no space left" in line), line
    # every file of the first run is as it was (config.yaml, metrics, the checkpoint), no leftovers
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    filler.unlink()
    proc = _cli("train", "--resume", str(run), "run.iterations=2")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_cli_corrupt_model_path_file_is_one_line(tmp_path):
    model = tmp_path / "model"
    # The encoder kept: a random model's text encoder exists nowhere else to copy into the save.
    cfg = tiny_config(tmp_path, "run.iterations=1", "model.keep_text_encoder=true", *QUIET)
    trainer = Trainer(cfg)
    trainer.adapter.save_pretrained(model)
    weights = sorted((model / "transformer").glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])    # header intact, data cut
    line = _one_line(_cli("train", "--config", str(TINY_CONFIG), f"run.output_dir={tmp_path / 'run2'}",
                          "model.init=null", f"model.path={model}", *QUIET))
    assert f"{weights} is not a readable safetensors file (Error while deserializing header: incomplete" in line
    assert not (tmp_path / "run2").exists()


# ---------------------------------------------------------------- the reward server
@pytest.fixture(scope="module")
def server_url():
    from rewards.server import BackgroundServer, create_app

    with BackgroundServer(create_app({"frame_change": 1.0})) as u:
        yield u


def _stats(url: str) -> dict:
    import httpx
    return httpx.get(url + "/health").json()["stats"]


@pytest.mark.parametrize("kind", ["json", "binary"])
def test_deeply_nested_json_is_a_clean_400(server_url, kind):
    import struct

    import httpx

    from rewards.wire import BINARY_TYPE

    nested = b"[" * 50_000 + b"]" * 50_000
    if kind == "json":
        body, ctype = b'{"videos": ' + nested + b"}", "application/json"
    else:
        body, ctype = b"FDV1" + struct.pack("<I", len(nested)) + nested, BINARY_TYPE
    before = _stats(server_url)
    r = httpx.post(server_url + "/score", content=body, headers={"content-type": ctype}, timeout=60)
    assert r.status_code == 400, r.text
    where = "body" if kind == "json" else "header"
    assert r.json() == {"error": f"{where} nests JSON deeper than 16 levels"}
    after = _stats(server_url)
    assert after["requests_rejected"] == before["requests_rejected"] + 1
    assert after["requests_failed"] == before["requests_failed"]
    # 17 levels (just past the limit) is refused too; the server kept serving
    r = httpx.post(server_url + "/score", content=b"[" * 17 + b"]" * 17, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "deeper than 16" in r.json()["error"]


def test_an_unexpected_error_is_a_json_500_counted_in_health(server_url, monkeypatch):
    import httpx

    import rewards.server as server
    from rewards.wire import encode_request

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(server, "decode_request", broken)
    before = _stats(server_url)["requests_failed"]
    body = encode_request(torch.zeros(1, 3, 8, 8, 3, dtype=torch.uint8), ["a"], 8.0)
    r = httpx.post(server_url + "/score", content=body, headers={"content-type": "application/x-flowdppo-videos"})
    assert r.status_code == 500 and r.json() == {"error": "internal error: ZeroDivisionError: a bug"}
    assert _stats(server_url)["requests_failed"] == before + 1
    monkeypatch.undo()
    r = httpx.post(server_url + "/score", content=body, headers={"content-type": "application/x-flowdppo-videos"})
    assert r.status_code == 200                                          # and it keeps serving


def test_an_open_bind_without_a_token_is_refused(tmp_path):
    from flowdppo_video.runs.config import ConfigError
    from flowdppo_video.commands.serve import check_open_bind

    for host in ("0.0.0.0", "::", "192.168.1.7", "example.org"):
        with pytest.raises(ConfigError, match=rf"--host {host} is reachable from other machines and no token"):
            check_open_bind(host, None, allow_open=False)
        check_open_bind(host, "s3cret", allow_open=False)               # a token: fine
        check_open_bind(host, None, allow_open=True)                    # said so explicitly: fine
    for host in ("127.0.0.1", "::1", "localhost"):
        check_open_bind(host, None, allow_open=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("rewards: {frame_change: 1.0}\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "flowdppo_video", "serve-rewards", "--config", str(cfg),
                               "--host", "0.0.0.0", "--port", "0", "--log-level", "error"],
                              capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "FLOWDPPO_REWARD_TOKEN"})
    except subprocess.TimeoutExpired:
        pytest.fail("serve-rewards --host 0.0.0.0 without a token started serving")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "flowdppo-video: error: --host 0.0.0.0 is reachable from other machines and no token is set: give --token "
        "(or $FLOWDPPO_REWARD_TOKEN), or --allow-open to serve it to anyone who reaches the port"]



# ---------------------------------------------------------------- SIGKILL inside checkpoint writes
_SAVE_FOREVER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.conftest import tiny_config
from flowdppo_video.training.checkpoint import latest_checkpoint, save_checkpoint
from flowdppo_video.trainer import Trainer
base = Path(sys.argv[1])
last = latest_checkpoint(base / "run")
t = Trainer(tiny_config(base, "run.iterations=1000000", "run.sample_every=100", "run.num_sample_videos=0"),
            resume=last is not None)                       # a resume loads (and verifies) the newest
i = int(last.name[5:]) if last else 0
print("ready", flush=True)
while True:
    i += 1
    save_checkpoint(base / "run", t.adapter, t.updater, i, {{"prompts_sha": t.prompts_sha()}}, keep=2)
"""


@pytest.mark.slow
def test_sigkill_inside_checkpoint_writes_never_leaves_a_torn_checkpoint(tmp_path):
    """Kill a process that does nothing but write checkpoints, at random moments, three times:
    every checkpoint left verifies against its manifest, and the next writer carries on."""
    import signal
    import time

    from flowdppo_video.training.checkpoint import list_checkpoints, verify_checkpoint


    script = tmp_path / "save_forever.py"
    script.write_text(_SAVE_FOREVER.format(root=str(ROOT)))
    rng = random.Random(17)
    seen = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
            time.sleep(rng.uniform(0.2, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        found = list_checkpoints(tmp_path / "run")
        assert found and all(verify_checkpoint(c) is None for c in found), [verify_checkpoint(c) for c in found]
        assert int(found[-1].name[5:]) > seen                       # each writer got further
        seen = int(found[-1].name[5:])


def test_score_out_naming_a_file_fails_before_scoring(tmp_path, capsys, monkeypatch):
    from flowdppo_video.commands import scoring
    from flowdppo_video.commands.cli import main
    from flowdppo_video.runs.video import write_video

    write_video(tmp_path / "v" / "a.mp4", np.zeros((5, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "v" / "prompts.txt").write_text("a prompt\n")
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")

    def never(*a, **k):
        raise AssertionError("scored before the output folder was checked")

    monkeypatch.setattr(scoring, "score_files", never)
    assert main(["score", str(tmp_path / "v"), "--reward", "frame_change", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flowdppo-video: error: --out {blocker} is a file, not a folder"]
    assert main(["score", str(tmp_path / "v"), "--reward", "frame_change", "--out", str(blocker / "sub")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {blocker / 'sub'} is under {blocker}, which is a file, "
                                                    "not a folder")
    assert blocker.read_text() == "keep me"


def test_an_os_error_in_any_command_is_one_line_naming_the_path(tmp_path, capsys):
    """A read-only output folder (report here; train, score and sample go the same way) is exit 2
    and one line naming the path, from a real EROFS: /proc refuses every new entry, root or not."""
    from flowdppo_video.commands.cli import main

    Trainer(tiny_config(tmp_path, "run.iterations=1", *QUIET)).run()
    out = Path("/proc/flowdppo_report_test")
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flowdppo-video: error: {out}") and ": " in err[0], err


def test_running_maxima_keep_a_nan():
    """``max(x, nan)`` is x: a NaN KL or ratio would vanish from kl/max; the stats keep it."""
    from flowdppo_video.training.policy_update import RunningStats

    acc = RunningStats()
    acc.add({"kl_max": 0.5})
    acc.add({"kl_max": float("nan")})
    acc.add({"kl_max": 0.25})
    assert math.isnan(acc.maxes["kl_max"]) and math.isnan(acc.mean("kl_max"))


def test_manifest_hashes_small_files_whole_and_large_files_at_both_ends(tmp_path, monkeypatch):
    """A save must not read a 100 GB optimizer state again: over WHOLE_HASH_BYTES a file is
    vouched for by its size and the hash of its two ends (truncation and torn tails are caught)."""
    from flowdppo_video.training import checkpoint as ck

    monkeypatch.setattr(ck, "WHOLE_HASH_BYTES", 1000)
    monkeypatch.setattr(ck, "ENDS_BYTES", 100)
    (tmp_path / "sub").mkdir()
    small, large = tmp_path / "small.bin", tmp_path / "sub" / "large.bin"
    small.write_bytes(bytes(range(200)))
    large.write_bytes(bytes(5000))
    ck.write_manifest(tmp_path)
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert set(files) == {"small.bin", "sub/large.bin"}
    assert "sha256" in files["small.bin"] and "sha256_ends" in files["sub/large.bin"]
    assert ck.verify_checkpoint(tmp_path) is None

    def flipped(path: Path, at: int) -> str | None:
        data = bytearray(path.read_bytes())
        data[at] ^= 1
        path.write_bytes(bytes(data))
        try:
            return ck.verify_checkpoint(tmp_path)
        finally:
            data[at] ^= 1
            path.write_bytes(bytes(data))

    assert flipped(small, 100) == "small.bin does not match its SHA-256 in the manifest"
    assert flipped(large, 4990) == "sub/large.bin does not match the SHA-256 of its ends in the manifest"
    assert flipped(large, 5) is not None
    assert flipped(large, 2500) is None               # the middle of a large file: the documented limit
    large.write_bytes(bytes(4000))
    assert ck.verify_checkpoint(tmp_path) == "sub/large.bin has 4000 bytes, the manifest says 5000"


# ---------------------------------------------------------------- score: bounded memory, frame counts
def _mixed_sizes(folder: Path, n: int) -> list[Path]:
    from flowdppo_video.runs.video import write_video

    rng = np.random.default_rng(0)
    files = [write_video(folder / f"{k:02d}.mp4", rng.integers(0, 256, (5, 16 + 2 * k, 16, 3), dtype=np.uint8))
             for k in range(n)]
    (folder / "prompts.txt").write_text("".join(f"prompt {k}\n" for k in range(n)))
    return files


def test_score_holds_at_most_a_batch_of_videos_whatever_the_sizes(tmp_path, monkeypatch):
    """12 videos of 12 sizes with --batch-size 4: before, all 12 waited for the end (one group
    each); now at most 4 decoded videos wait, and every file is scored with its frame count."""
    import rewards as R
    from flowdppo_video.commands import scoring
    from flowdppo_video.commands.scoring import score_files
    from flowdppo_video.runs import video as video_mod

    files = _mixed_sizes(tmp_path / "v", 12)
    held = {"now": 0, "max": 0}
    real_read, real_score = video_mod.read_video, R.score_videos

    def read(path):
        held["now"] += 1
        held["max"] = max(held["max"], held["now"])
        return real_read(path)

    def score(fns, videos, prompts, **kw):
        held["now"] -= videos.shape[0]
        return real_score(fns, videos, prompts, **kw)

    monkeypatch.setattr(scoring, "read_video", read)          # what score_files calls
    monkeypatch.setattr(R, "score_videos", score)
    rows, _, skipped = score_files(files, [f"p{k}" for k in range(12)], {"frame_change": 1.0}, batch_size=4)
    assert held["max"] <= 4 + 1 and held["now"] == 0       # the one just read, before it joins a batch
    assert [r["file"] for r in rows] == [str(f) for f in files] and not skipped
    assert all(r["frames"] == 5 and r["ended_early"] is False for r in rows)


def test_a_file_that_ends_early_is_warned_about_and_flagged(tmp_path, monkeypatch, capsys):
    from flowdppo_video.commands import scoring
    from flowdppo_video.commands.cli import main
    from flowdppo_video.runs import video as video_mod

    files = _mixed_sizes(tmp_path / "v", 2)
    assert video_mod.declared_frames(files[0]) == 5          # what the container says, when it says it
    # A container that declares 17 frames but holds 5 (a cut faststart mp4 decodes like this).
    monkeypatch.setattr(scoring, "declared_frames", lambda p: 17 if Path(p) == files[1] else 5)
    assert main(["score", str(tmp_path / "v"), "--reward", "frame_change", "--out", str(tmp_path / "out")]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "ends early" in ln]
    assert err == [f"flowdppo-video: warning: {files[1]} ends early: 5 of the 17 frames its container declares "
                   "decoded; scored from those (ended_early in the output)"]
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [(r["frames"], r["ended_early"]) for r in rows] == [(5, False), (5, True)]


def test_an_os_error_naming_no_file_names_the_output_folder(tmp_path, capsys, monkeypatch):
    """av and a write() on a full disk raise OSErrors without a file name: the line names --out."""
    import errno

    from flowdppo_video.commands import scoring
    from flowdppo_video.commands.cli import main
    from flowdppo_video.runs.fsio import os_error_line

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    _mixed_sizes(tmp_path / "v", 1)
    monkeypatch.setattr(scoring, "write_outputs", full)
    assert main(["score", str(tmp_path / "v"), "--reward", "frame_change", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flowdppo-video: error: No space left on device (writing under --out {tmp_path / 'o'})")
    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "/x/y")) == "/x/y: Read-only file system"
    assert os_error_line(OSError("two\nlines")) == "two"


def test_latest_checkpoint_skips_a_damaged_one_and_load_names_the_file(finished_run, tmp_path, capsys):
    """What sample, export and eval use: the newest checkpoint that verifies (a warning names the
    one skipped, which stays where it is); loading a damaged file is one CheckpointError line."""
    from flowdppo_video.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    run = _copy(finished_run, tmp_path)
    f = run / "checkpoints" / "iter_000002" / "model" / "pytorch_lora_weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert latest_checkpoint(run) == run / "checkpoints" / "iter_000001"
    size = json.loads((f.parents[1] / "manifest.json").read_text())["files"][f"model/{f.name}"]["bytes"]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"flowdppo-video: warning: skipping checkpoint {run / 'checkpoints' / 'iter_000002'} "
        f"(model/pytorch_lora_weights.safetensors has 100 bytes, the manifest says {size})"]
    assert latest_checkpoint(run, verified=False) == run / "checkpoints" / "iter_000002"
    assert (run / "checkpoints" / "iter_000002").is_dir()                     # left where it is
    trainer = Trainer(tiny_config(tmp_path / "other", *QUIET))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(run / "checkpoints" / "iter_000002", trainer.adapter, None)
    assert str(e.value).startswith(f"could not load checkpoint {run / 'checkpoints' / 'iter_000002' / 'model'}: "
                                   "SafetensorError: ") and "\n" not in str(e.value)


def test_a_failed_checkpoint_write_names_its_cause_and_a_resave_replaces_whole(finished_run, tmp_path, monkeypatch):
    from flowdppo_video.training.checkpoint import (
        CheckpointError, list_checkpoints, save_checkpoint, verify_checkpoint)

    run = _copy(finished_run, tmp_path)
    trainer = Trainer(tiny_config(tmp_path / "other", *QUIET))
    save_checkpoint(run, trainer.adapter, trainer.updater, 2, {}, keep=5)          # iter_000002 again
    assert [c.name for c in list_checkpoints(run)] == ["iter_000001", "iter_000002"]
    assert all(verify_checkpoint(c) is None for c in list_checkpoints(run))
    assert not list((run / "checkpoints").glob(".*"))                             # no tmp, no trash

    def broken(folder):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534\nmore")

    monkeypatch.setattr(trainer.updater, "save", broken)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(run, trainer.adapter, trainer.updater, 3, {}, keep=5)
    assert str(e.value) == (f"could not write checkpoint {run / 'checkpoints' / 'iter_000003'}: RuntimeError: "
                            "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534; the previous "
                            "checkpoints are kept")
    assert [c.name for c in list_checkpoints(run)] == ["iter_000001", "iter_000002"]
    assert not list((run / "checkpoints").glob(".*"))


def test_nonfinite_evaluation_videos_are_counted_and_named(tmp_path, monkeypatch, capsys):
    from flowdppo_video.training import evaluation


    real = evaluation.rollout

    def nan_last(*a, **k):
        traj = real(*a, **k)
        traj.final[-1] = float("inf")
        return traj

    monkeypatch.setattr(evaluation, "rollout", nan_last)
    cfg = tiny_config(tmp_path, "run.iterations=1", *QUIET, f"eval.prompts={ROOT / 'configs/prompts/demo.txt'}",
                      "eval.kl_to_base=false")
    row = Trainer(cfg).run()[0]
    evals = [json.loads(ln) for ln in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["videos/eval_nonfinite"] for e in evals] == [1, 1] and row["videos/eval_nonfinite"] == 1
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "evaluation after" in ln]
    assert len(warned) == 2 and warned[0].startswith("flowdppo-video: warning: evaluation after 0 iterations: 1 of ")


def test_checkpoints_keep_the_cuda_generator(monkeypatch):
    """Issue 28, item 7: on a GPU the checkpoint keeps the device generator beside the CPU ones and
    resume restores it (a double of torch.cuda's generator: this suite has no GPU)."""
    from flowdppo_video.training import checkpoint

    device_gen = {"state": torch.arange(8, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": device_gen["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": device_gen.update(state=s.clone()))
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cuda"], torch.arange(8, dtype=torch.uint8))
    device_gen["state"] = torch.zeros(8, dtype=torch.uint8)            # the generator moved on
    checkpoint.set_rng_state(saved)
    assert torch.equal(device_gen["state"], torch.arange(8, dtype=torch.uint8))


@pytest.mark.parametrize("preset, want", [(None, "1"), ("3", "3")])
def test_nccl_watchdog_behaviour_is_set_before_nccl_starts(monkeypatch, preset, want):
    """Issue 28, item 9: on NCCL a timeout is the watchdog's (docs/many_gpus.md); its behaviour is set
    deliberately (tear down) before the process group starts, a user's own setting kept. NCCL and the
    GPU are doubles here: the rendezvous records the environment it would start with, then fails."""
    import torch.distributed as dist

    from flowdppo_video.runs.config import ParallelConfig
    from flowdppo_video.parallel.groups import CollectiveTimeout, init_parallel

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "x"}.items():
        monkeypatch.setenv(k, v)                      # set first so that undo restores what was there
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    if preset is not None:
        monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", preset)
    seen = {}

    def rendezvous(backend, **kwargs):
        seen.update(backend=backend, handling=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
        raise RuntimeError("no peers in this test")

    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", rendezvous)
    with pytest.raises(CollectiveTimeout, match="could not join the process group"):
        init_parallel(ParallelConfig(backend="nccl"), "cuda")
    assert seen == {"backend": "nccl", "handling": want}


def test_a_rendezvous_port_is_free_and_outside_the_kernels_ephemeral_range():
    """CI lost a DeepSpeed rendezvous to a reward server of the next test worker: the port from
    ``bind(0)`` was handed out again before the launcher's store listened. ``free_port`` now picks
    from outside the range ``bind(0)`` and outgoing connections draw from."""
    import socket

    from flowdppo_video.parallel.groups import ephemeral_port_range, free_port

    low, high = ephemeral_port_range()
    ports = [free_port() for _ in range(20)]
    assert all(not low <= p <= high and 1024 < p < 65536 for p in ports), ports
    assert len(set(ports)) > 1                      # drawn, not one fixed port every process agrees on
    with socket.socket() as s:                      # and free: it binds
        s.bind(("127.0.0.1", ports[-1]))
