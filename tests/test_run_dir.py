"""Issue 30: a run directory is owned, verified and never mixed. One test per numbered case of the
issue (docs/reliability.md lists them with their one-line messages). Fast by design: most cases
fail before a model is built, and checkpoints are made of doubles where only their files matter."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flowdppo_video.training import checkpoint
from flowdppo_video.commands.cli import main
from flowdppo_video.runs.config import ConfigError, config_to_dict, load_config, load_yaml
from flowdppo_video.exceptions import TrainingError

from .conftest import ROOT, TINY_CONFIG, tiny_config

QUIET = ["run.tensorboard=false", "run.report_every=0", "run.num_sample_videos=0",
         f"data.prompts={ROOT / 'configs/prompts/demo.txt'}"]


def error_line(capsys) -> str:
    """The one error line of a command (notes and warnings aside)."""
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in err if "warning:" not in ln and "note:" not in ln]
    assert len(errors) == 1 and errors[0].startswith("flowdppo-video: error: "), err
    return errors[0]


def train(*args: str) -> int:
    return main(["train", "--config", str(TINY_CONFIG), *QUIET, *args])


def fake_run(path: Path) -> Path:
    """A folder with a run's resolved config.yaml (what --resume, sample and report look for)."""
    path.mkdir(parents=True)
    cfg = config_to_dict(tiny_config(path.parent, f"run.output_dir={path}"))
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (path / ".flowdppo_run").write_text("{}\n")
    return path


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- 1. owned
def test_1_an_empty_or_dot_output_dir_and_a_foreign_folder_are_refused(tmp_path, monkeypatch, capsys):
    home = tmp_path / "p"
    home.mkdir()
    mine = home / "config.yaml"
    mine.write_text(f"# mine\nbase: {TINY_CONFIG}\n")
    monkeypatch.chdir(home)
    assert main(["train", "--config", str(mine), *QUIET, "run.output_dir="]) == 2      # $UNSET
    assert error_line(capsys) == ("flowdppo-video: error: run.output_dir is empty (an unset shell variable?): give "
                                  "the run a folder of its own, e.g. runs/NAME")
    assert main(["train", "--config", str(mine), *QUIET, "run.output_dir=."]) == 2
    assert "run.output_dir=. is the current directory" in error_line(capsys)
    assert sorted(p.name for p in home.iterdir()) == ["config.yaml"] and mine.read_text().startswith("# mine")
    # a folder holding a user's files (not made by a run) is refused unless said so explicitly
    monkeypatch.chdir(tmp_path)
    assert train(f"run.output_dir={home}") == 2
    assert error_line(capsys) == (f"flowdppo-video: error: run.output_dir {home} holds files no run wrote "
                                  "(config.yaml): give a new or empty folder, or run.allow_foreign_files=true to "
                                  "write the run among them (a config.yaml there is replaced)")
    assert sorted(p.name for p in home.iterdir()) == ["config.yaml"] and mine.read_text().startswith("# mine")
    from flowdppo_video.runs.run_dir import check_new_run

    check_new_run(home, allow_foreign=True)                  # said so: accepted


# ---------------------------------------------------------------- 2. locked
def test_2_a_second_training_or_resume_of_a_locked_run_stops_at_once(tmp_path, capsys):
    from flowdppo_video.runs.run_dir import LOCK, RunLock

    run = fake_run(tmp_path / "run")
    before = snapshot(run)
    lock = RunLock.acquire(run)                   # another training holding the run
    try:
        for argv in (["train", "--resume", str(run)], ["train", "--config", str(TINY_CONFIG), *QUIET,
                                                        f"run.output_dir={tmp_path / 'run'}", "run.allow_foreign_files=true"]):
            assert main(argv) == 2
            line = error_line(capsys)
            assert line.startswith(f"flowdppo-video: error: {run} is in use by pid {os.getpid()} on "
                                   f"{socket.gethostname()} (since "), line
            assert line.endswith("one process writes a run at a time (wait for it to finish, or stop it)")
    finally:
        lock.release()
    assert not (run / LOCK).exists() and snapshot(run) == before
    # a lock file left by a process that died (a crash: the kernel dropped its flock) is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    lock = RunLock.acquire(run)
    assert capsys.readouterr().err.strip() == (f"flowdppo-video: note: {run} was locked by pid {dead.pid} on "
                                               f"{socket.gethostname()} (since then), which is gone; taking the "
                                               "lock over")
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


# ---------------------------------------------------------------- 3. --resume A run.output_dir=B
def test_3_resume_into_another_output_dir_is_refused(tmp_path, capsys):
    a = fake_run(tmp_path / "a")
    before = snapshot(a)
    assert main(["train", "--resume", str(a), f"run.output_dir={tmp_path / 'b'}"]) == 2
    assert error_line(capsys).startswith(f"flowdppo-video: error: --resume {a} with run.output_dir={tmp_path / 'b'}: "
                                         "a run resumes in its own folder")
    assert not (tmp_path / "b").exists() and snapshot(a) == before


# ---------------------------------------------------------------- 4. the text cache is verified
class _Encoder:
    """The parts of an adapter the text cache uses, with a counting encoder."""

    device = torch.device("cpu")
    experts: list = []

    def __init__(self) -> None:
        self.encoded = 0

    def reference_copies(self) -> dict:
        return {}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        self.encoded += len(prompts)
        return torch.stack([torch.full((3, 4), float(len(p))) for p in prompts])

    def text_encoders_resident(self) -> bool:
        return True

    def release_text_encoders(self) -> int:
        return 0


@pytest.mark.parametrize("damage", ["flipped bits", "0xff bytes, no checksum"])
def test_4_a_damaged_text_cache_is_one_line_and_encoded_again(tmp_path, capsys, damage):
    from flowdppo_video.models.text_cache import cache_prompts, checksum_path

    path = tmp_path / "text_cache.safetensors"
    cache_prompts(_Encoder(), ["a red ball", "a cube"], None, "k", path, progress=False)
    assert checksum_path(path).is_file()
    data = bytearray(path.read_bytes())
    if damage == "flipped bits":
        for i in (1, 2, 3, 5):
            data[-i * 4] ^= 0x10
    else:                                   # a cache from before checksums: its values are checked
        data[-50:] = b"\xff" * 50
        checksum_path(path).unlink()
    path.write_bytes(bytes(data))
    enc = _Encoder()
    stats = cache_prompts(enc, ["a red ball", "a cube"], None, "k", path, progress=False)
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    why = "does not match its checksum (text_cache.safetensors.sha256)" if damage == "flipped bits" else \
        "holds non-finite values"
    assert warned == [f"flowdppo-video: warning: {path} {why}; encoding its prompts again"]
    assert stats["text/cached_prompts"] == 0 and enc.encoded == 2
    assert torch.isfinite(enc.text_cache.rows(enc, None, ["a cube"])).all()


# ---------------------------------------------------------------- 5, 6. checkpoints are verified
class _Adapter:
    def load_trainable(self, path: Path) -> None:
        self.loaded = path

    def save_trainable(self, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "w.bin").write_bytes(b"weights")


class _Updater:
    restores_weights = False

    def load(self, path: Path) -> None:
        pass

    def save(self, path: Path) -> None:
        (path / "optimizer.pt").write_bytes(b"moments")

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _ckpts(run: Path, manifests: tuple[bool, ...]) -> None:
    for n, manifest in enumerate(manifests, 1):
        checkpoint.save_checkpoint(run, _Adapter(), _Updater(), n, {}, keep=10)
        if not manifest:
            (run / "checkpoints" / f"iter_{n:06d}" / checkpoint.MANIFEST).unlink()


def _resume(run: Path) -> Path | None:
    from flowdppo_video.parallel.groups import ParallelState

    return checkpoint.resume_checkpoint(run, _Adapter(), _Updater(), ParallelState(), 0, 10)[0]


def test_5_a_checkpoint_without_manifest_among_manifested_ones_is_skipped(tmp_path, capsys):
    run = tmp_path / "run"
    _ckpts(run, (True, False))
    assert checkpoint.latest_checkpoint(run) == run / "checkpoints" / "iter_000001"        # sample, export, eval
    assert _resume(run) == run / "checkpoints" / "iter_000001"
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1] == ("flowdppo-video: warning: skipped checkpoint iter_000002 (manifest.json is missing (the run's "
                       f"other checkpoints have one)); moved it to {run / 'checkpoints' / 'corrupt_iter_000002'}; "
                       "resuming from iter_000001")


def test_6_a_dangling_checkpoint_symlink_is_set_aside_and_the_run_moves_on(tmp_path, capsys):
    run = tmp_path / "run"
    _ckpts(run, (True,))
    (run / "checkpoints" / "iter_000002").symlink_to(tmp_path / "nowhere")
    assert _resume(run) == run / "checkpoints" / "iter_000001"
    assert capsys.readouterr().err.strip() == (
        f"flowdppo-video: warning: checkpoints/iter_000002 is a symlink to {tmp_path / 'nowhere'}, not a "
        f"checkpoint; moved it to {run / 'checkpoints' / 'corrupt_iter_000002'}")
    checkpoint.save_checkpoint(run, _Adapter(), _Updater(), 2, {}, keep=10)     # the iteration is saved
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["iter_000001", "iter_000002"]
    assert not list((run / "checkpoints").glob(".tmp_*"))


# ---------------------------------------------------------------- 7. sample --out never overwrites
def test_7_sample_out_refuses_a_non_empty_folder(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "samples"
    out.mkdir()
    (out / "index.json").write_text("theirs")
    assert main(["sample", "--run", str(run), "--out", str(out), "--checkpoint", "base"]) == 2
    assert error_line(capsys) == (f"flowdppo-video: error: --out {out} exists and is not empty; nothing was written "
                                  "(give a new or empty folder)")
    assert (out / "index.json").read_text() == "theirs"


# ---------------------------------------------------------------- 8. score: memory bounded by pixels
def test_8_score_holds_videos_to_a_memory_budget_and_scales_one_over_it(tmp_path, monkeypatch, capsys):
    import rewards as R
    from flowdppo_video.commands import scoring
    from flowdppo_video.runs.video import write_video

    rng = np.random.default_rng(0)
    files = [write_video(tmp_path / f"{k}.mp4", rng.integers(0, 256, (5, 64, 96, 3), dtype=np.uint8))
             for k in range(4)]
    big = write_video(tmp_path / "z_big.mp4", rng.integers(0, 256, (5, 256, 384, 3), dtype=np.uint8))
    share = 5 * 64 * 96 * 3 * scoring.WORK_FACTOR * 2               # two small videos' work
    monkeypatch.setattr(scoring, "resident_bytes", lambda: 0)
    monkeypatch.setattr(scoring, "MIN_SHARE", 0)
    batches, real = [], R.score_videos

    def score(fns, videos, prompts, **kw):
        batches.append(videos.numel() * scoring.WORK_FACTOR)
        return real(fns, videos, prompts, **kw)

    monkeypatch.setattr(R, "score_videos", score)
    rows, _, _ = scoring.score_files([*files, big], [""] * 5, {"frame_change": 1.0}, batch_size=8,
                                     memory_budget=share)
    assert max(batches) <= share and len(batches) == 3              # batch 8 by count, 2 by pixels
    assert (rows[-1]["height"], rows[-1]["width"]) == scoring.fit_size(5, 256, 384, share) == (90, 134)
    assert capsys.readouterr().err.strip() == (
        f"flowdppo-video: warning: {big}: 5 frames of 384x256 need about 0.0 GB to score, over --memory-budget "
        f"{share / 1e9:g} GB: scored at 134x90")


# ---------------------------------------------------------------- 9. one line, exit 2, before the run directory
@pytest.mark.parametrize("override, expected", [
    ("run.seed=20000000000000", "run.seed must be an integer in [0, 4294967295], got 20000000000000"),
    ("model.init_seed=99999999999999999999", "model.init_seed must be an integer in [0, 4294967295]"),
    ("run.device=cuda", "run.device=cuda but "),
    ("video.height=65536", "video.height=65536 gives 4096 token positions along that axis; this model's rotary "
                           "embedding holds 64 (rope_max_seq_len)"),
    ("data.group_size=10000000", "data.prompts_per_iteration x data.group_size = 2 x 10000000 videos per iteration "
                                 "hold about "),
])
def test_9_bad_inputs_are_one_line_before_the_run_directory_exists(tmp_path, capsys, monkeypatch, override, expected):
    if override.startswith("run.device") and torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    assert train(f"run.output_dir={tmp_path / 'run'}", override) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_9_num_frames_past_the_rotary_table_is_refused_by_the_model():
    from flowdppo_video.models import build_adapter

    adapter = build_adapter(load_config(TINY_CONFIG).model, torch.device("cpu"))
    with pytest.raises(Exception, match=r"video.num_frames=100001 gives 25001 token positions along that axis"):
        adapter.latent_shape(100001, 32, 32)


def test_9_a_full_disk_while_the_text_cache_is_saved_is_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from flowdppo_video.models import text_cache
    from flowdppo_video.models.base import ModelError
    from flowdppo_video.models.text_cache import TextCache

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(text_cache, "save_file", full)        # what TextCache.save calls
    cache = TextCache("k")
    cache.entries[(None, "a")] = torch.zeros(1, 2)
    with pytest.raises(ModelError) as e:
        cache.save(tmp_path / "text_cache.safetensors")
    assert str(e.value).startswith(f"could not write the text cache {tmp_path / 'text_cache.safetensors'}: "
                                   "SafetensorError: Error while serializing") and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_9_report_on_an_unparsable_config_and_resume_over_a_binary_log(tmp_path, capsys):
    from flowdppo_video.training.metrics import read_metrics, truncate_metrics

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: [1,\n")
    assert main(["report", str(run)]) == 2
    assert error_line(capsys).startswith(f"flowdppo-video: error: config file {run / 'config.yaml'} is not valid "
                                         "YAML: line ")
    log = run / "metrics.jsonl"
    log.write_bytes(b"\x00\xff\xfe" * 20)
    with pytest.raises(TrainingError, match=rf"^{log} is not a metrics log \(not UTF-8 text at byte 1\)"):
        truncate_metrics(run, 0)
    log.write_text('{"iteration": 0}\nnot json\n{"iteration": 1}\n')
    with pytest.raises(TrainingError, match=rf"^{log} line 2 is not a JSON row"):
        read_metrics(run)
    log.write_text('{"iteration": 0}\n{"iteration": 1}\n{"itera')           # a kill's torn last line: fine
    assert truncate_metrics(run, 1) == 2 and read_metrics(run) == [{"iteration": 0}]


# ---------------------------------------------------------------- 10. the reward server: a client's error is 4xx
def test_10_the_reward_server_answers_client_errors_with_4xx():
    import httpx

    from rewards.server import BackgroundServer, create_app
    from rewards.wire import BINARY_TYPE, encode_request

    def post(url: str, videos: torch.Tensor, prompt: str) -> httpx.Response:
        return httpx.post(url + "/score", content=encode_request(videos, [prompt], 8.0),
                          headers={"content-type": BINARY_TYPE}, timeout=60)

    with BackgroundServer(create_app({"world_direction": 1.0})) as url:
        stats = lambda: httpx.get(url + "/health").json()["stats"]      # noqa: E731
        r = post(url, torch.zeros(1, 5, 32, 32, 3, dtype=torch.uint8), "hello")
        assert r.status_code == 422 and r.json()["error"].startswith(
            "reward 'world_direction' failed: ValueError: prompt 'hello' is not of the form")
        r = post(url, torch.zeros(1, 5, 1, 1, 3, dtype=torch.uint8), "a purple circle moves left slowly on black")
        assert r.status_code == 422, r.text
        host, port = url.split("//")[1].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:      # a client gone mid-body
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: " + BINARY_TYPE.encode() +
                      b"\r\nContent-Length: 1000\r\n\r\n" + b"FDV1" + bytes(6))
        deadline = time.monotonic() + 20
        while stats()["requests_rejected"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stats()["requests_rejected"] == 3 and stats()["requests_failed"] == 0


# ---------------------------------------------------------------- 11. smaller holes
def test_11_group_size_1_and_duplicate_yaml_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.group_size must be >= 2 \(a group needs two videos to compare"):
        load_config(TINY_CONFIG, ["data.group_size=1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {iterations: 3}\noptim: {lr: 0.1}\nrun:\n  seed: 4\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(recipe)
    assert str(e.value) == (f"config file {recipe}: line 3, column 1: key 'run' appears twice in one mapping (the "
                            "second would replace the first)")


def test_11_a_full_disk_leaves_no_empty_png(tmp_path, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    from flowdppo_video.reporting.plots import plot_curves

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "reward/mean": 0.5, "kl/mean": 0.0,
                                                        "mask/drop_frac": 0.0}) + "\n")

    def full(self, fname, **kw):
        open(fname, "wb").close()                 # what a full disk leaves: the file, no bytes
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(OSError):
        plot_curves(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if p.suffix == ".png"]


def test_11_short_refusals_batch_size_token_and_one_frame_flicker(tmp_path, capsys):
    import rewards
    from flowdppo_video.commands.serve import check_token

    with pytest.raises(SystemExit) as e:
        main(["score", str(tmp_path), "--reward", "frame_change", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err) < 600
    assert err.strip().splitlines()[-1].endswith("argument --batch-size: must be an integer from 1 to 1024, got '0'")
    with pytest.raises(ConfigError, match=r"^--token is blank or has spaces around it"):
        check_token("   ", "--token")
    with pytest.raises(rewards.RewardInputError, match="temporal_flicker needs videos of at least 2 frames"):
        rewards.score_videos(rewards.build_rewards({"temporal_flicker": 1.0}),
                             torch.zeros(1, 1, 32, 32, 3, dtype=torch.uint8), ["a"], fps=8.0)


def test_11_an_unreadable_checkpoint_file_is_named_itself(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _ckpts(run, (True,))
    real = checkpoint.file_sha256

    def denied(path, ends=0):
        if Path(path).name == "state.pt":      # chmod 000 (root reads through it: a double)
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, ends)

    monkeypatch.setattr(checkpoint, "file_sha256", denied)
    assert checkpoint.verify_checkpoint(run / "checkpoints" / "iter_000001") == "state.pt is unreadable (Permission denied)"


def test_11_eval_checks_a_damaged_checkpoint_before_sampling_and_ffmpeg_stays_quiet(tmp_path, capfd, monkeypatch):
    from flowdppo_video.reporting import eval_checkpoints
    from flowdppo_video.commands.scoring import score_files
    from flowdppo_video.runs.video import write_video

    run = fake_run(tmp_path / "run")
    _ckpts(run, (True,))
    ckpt = run / "checkpoints" / "iter_000001"
    (ckpt / "state.pt").write_bytes(b"torn")

    def never(*a, **k):
        raise AssertionError("sampled before the checkpoint was checked")

    monkeypatch.setattr(eval_checkpoints, "rollout", never)
    assert main(["eval", "--run", str(run), "--checkpoints", str(ckpt), "--prompts",
                 str(ROOT / "configs/prompts/demo.txt")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"flowdppo-video: error: --checkpoints: {ckpt} is damaged (state.pt has 4 bytes"), err
    # a file that is not a video: one warning line, none of ffmpeg's own
    good = write_video(tmp_path / "v" / "a.mp4", np.zeros((3, 16, 16, 3), dtype=np.uint8))
    bad = tmp_path / "v" / "b.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    score_files([good, bad], ["", ""], {"frame_change": 1.0})
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip() and "scoring" not in ln]
    assert len(err) == 1 and err[0].startswith(f"flowdppo-video: warning: skipping {bad}: cannot read it"), err
