"""What a run does with the run directory it is given: never prunes what it just wrote, refuses to train over another
run's checkpoints unless told to start over (which moves them aside), stops when no checkpoint is usable, keeps one
writer per directory (a second `mdtrain train` fails at once naming the holder), and turns a read-only directory, a
full disk during a save, a manifest that lists something other than the checkpoint's own files, and a tokenizer
pointing outside its directory into one-line errors, with every checkpoint already written left intact."""
import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from mdtrain import cli
from mdtrain.checkpoint import file_sha256, list_checkpoints, verify, write_manifest
from mdtrain.testing import OFFLINE_ENV

TINY = ["model.flavor=debug", "model.dropout=0.0", "data.train=synthetic:markov", "data.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=0.0", "optim.lr=1e-3",
        "optim.warmup_steps=1", "logging.every=1", "eval.batches=1", "eval.batch_size=4",
        "logging.progress_bar=false"]


def train(run_dir, *extra, capsys=None):
    """`mdtrain train` in this process (single-process ddp): (exit status, stderr)."""
    if capsys is not None:
        capsys.readouterr()
    rc = cli.main(["train", *TINY, f"train.run_dir={run_dir}", *extra])
    return rc, (capsys.readouterr().err if capsys is not None else "")


def steps(run_dir):
    return [s for s, _ in list_checkpoints(os.path.join(run_dir, "checkpoints"))]


def train_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(x) for x in fh if "split" not in json.loads(x)]


def truncate_biggest(ckpt):
    victim = max((os.path.join(d, f) for d, _, fs in os.walk(ckpt) for f in fs if f != "manifest.json"),
                 key=os.path.getsize)
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) // 2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4 (copied by the tests that damage it)."""
    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    assert train(run_dir, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=0")[0] == 0
    return run_dir


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".mdtrain.lock"))
    return str(dst)


# ---------------------------------------------------------------------------------------------------------------------
# pruning and starting over


def test_resume_false_over_checkpoints_is_an_error_and_start_over_moves_them_aside(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    rc, err = train(run, "train.steps=3", "checkpoint.resume=false", "checkpoint.keep_last=1", capsys=capsys)
    assert rc == 1 and "checkpoint.resume=false would train a new run over them" in err, err
    assert "checkpoint.start_over=true" in err
    assert steps(run) == [2, 4] and all(verify(p) is None for _, p in list_checkpoints(f"{run}/checkpoints"))

    rc, err = train(run, "train.steps=3", "checkpoint.resume=false", "checkpoint.start_over=true",
                    "checkpoint.keep_last=1", capsys=capsys)
    assert rc == 0, err
    [old] = os.listdir(os.path.join(run, "superseded"))
    aside = os.path.join(run, "superseded", old)
    assert steps(aside) == [2, 4] and all(verify(p) is None for _, p in list_checkpoints(f"{aside}/checkpoints"))
    assert [r["step"] for r in train_rows(aside)] == [1, 2, 3, 4]  # the old run's metrics moved with them
    assert steps(run) == [3] and [r["step"] for r in train_rows(run)] == [1, 2, 3]


def test_a_requeued_job_that_started_over_resumes_its_own_checkpoints(finished, tmp_path, monkeypatch, capsys):
    """The same command runs again after a requeue: starting over once more would lose its progress each time."""
    run = copy_run(finished, tmp_path / "run")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert train(run, "train.steps=2", "checkpoint.start_over=true", capsys=capsys)[0] == 0
    assert steps(run) == [2] and len(os.listdir(os.path.join(run, "superseded"))) == 1
    rc, err = train(run, "train.steps=3", "checkpoint.start_over=true", capsys=capsys)
    assert rc == 0, err
    assert steps(run) == [2, 3] and len(os.listdir(os.path.join(run, "superseded"))) == 1
    monkeypatch.setenv("SLURM_JOB_ID", "4343")  # another job: it starts over
    assert train(run, "train.steps=1", "checkpoint.start_over=true", capsys=capsys)[0] == 0
    assert steps(run) == [1] and len(os.listdir(os.path.join(run, "superseded"))) == 2


def test_no_usable_checkpoint_is_a_stop_listing_each_unless_starting_over(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    truncate_biggest(os.path.join(run, "checkpoints", "step_00000004"))
    os.unlink(os.path.join(run, "checkpoints", "step_00000002", "manifest.json"))
    rc, err = train(run, "train.steps=5", capsys=capsys)
    assert rc == 1, err
    line = err.strip().splitlines()[-1]
    assert "no usable checkpoint" in line and "step_00000004: file" in line and "truncated" in line
    assert "step_00000002: no manifest.json" in line and "checkpoint.start_over=true" in line
    assert steps(run) == [2, 4]  # nothing was touched
    rc, err = train(run, "train.steps=2", "checkpoint.start_over=true", capsys=capsys)
    assert rc == 0, err
    assert steps(run) == [2] and [r["step"] for r in train_rows(run)] == [1, 2]


def test_pruning_never_deletes_what_this_run_just_wrote(finished, tmp_path, capsys):
    """Resumed from step 2 because step 4 is damaged, with keep_last=1: the new step 3 must survive its own save
    (pruning by step number across the directory would keep the damaged step 4 and delete step 3)."""
    run = copy_run(finished, tmp_path / "run")
    truncate_biggest(os.path.join(run, "checkpoints", "step_00000004"))
    rc, err = train(run, "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=1", capsys=capsys)
    assert rc == 0, err
    assert steps(run) == [3, 4]  # 2 pruned (older), 3 kept, the damaged 4 not touched
    assert verify(os.path.join(run, "checkpoints", "step_00000003")) is None


# ---------------------------------------------------------------------------------------------------------------------
# one writer


def _env():
    return dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-m", "mdtrain", "train", *TINY, f"train.run_dir={run}",
                              "train.steps=100000", "checkpoint.every=0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (os.path.exists(f"{run}/metrics.jsonl") and train_rows(run)):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            time.sleep(0.1)
        t0 = time.time()
        rc, err = train(run, "train.steps=3", capsys=capsys)
        assert rc == 1 and time.time() - t0 < 30
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and "is in use" in err, err
        rows = len(train_rows(run))
        time.sleep(2)
        assert first.poll() is None and len(train_rows(run)) > rows  # the holder trains on, undisturbed
        logged = [r["step"] for r in train_rows(run)]  # read once: the holder keeps appending
        assert logged == list(range(1, len(logged) + 1))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead holder's lock: the next run takes it at once
    rc, err = train(run, "train.steps=2", "checkpoint.start_over=true", capsys=capsys)
    assert rc == 0, err


def test_without_flock_a_dead_holder_is_replaced_and_a_live_one_named(tmp_path, monkeypatch):
    """Filesystems without flock (some Lustre/GPFS mounts answer ENOLCK): the O_EXCL lock file records its holder."""
    import fcntl

    from mdtrain.faults import RunDirError
    from mdtrain.rundir import EXCL, RunDirLock, _proc_start

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = str(tmp_path / "run")
    os.makedirs(run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(run, EXCL), "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "start": "1"}, fh)
    lock = RunDirLock(run).acquire()  # stale: its holder is gone
    assert json.load(open(os.path.join(run, EXCL)))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(os.path.join(run, EXCL))

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(run, EXCL), "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": live.pid, "start": _proc_start(live.pid)}, fh)
        with pytest.raises(RunDirError, match=f"pid {live.pid} on host {socket.gethostname()}"):
            RunDirLock(run).acquire()
    finally:
        live.kill()
        live.wait()
    with open(os.path.join(run, EXCL), "w") as fh:
        json.dump({"host": "node-elsewhere", "pid": 1, "start": None}, fh)
    with pytest.raises(RunDirError, match=f"on host node-elsewhere.*delete {os.path.join(run, EXCL)}"):
        RunDirLock(run).acquire()


# ---------------------------------------------------------------------------------------------------------------------
# read-only directories and full disks


def _without_dac_override():
    """Run the child without root's permission override (the test may run as root), so a 0555 directory is what it
    is for everyone else: not writable."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_run_dir_is_a_clear_error_before_any_work(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    for d, dirs, files in os.walk(run):
        for name in dirs + files:
            os.chmod(os.path.join(d, name), 0o555 if name in dirs else 0o444)
    os.chmod(run, 0o555)
    try:
        kw = {"preexec_fn": _without_dac_override} if os.geteuid() == 0 else {}
        r = subprocess.run([sys.executable, "-m", "mdtrain", "train", *TINY, f"train.run_dir={run}",
                            "train.steps=6"], capture_output=True, text=True, env=_env(), timeout=300, **kw)
        assert r.returncode == 1, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == (f"mdtrain train: error: train.run_dir={run} is not writable "
                                                     f"(Permission denied): choose a writable train.run_dir (or fix "
                                                     f"the directory's permissions)")
        assert "step:" not in r.stdout
        # reading a read-only run is fine
        r = subprocess.run([sys.executable, "-m", "mdtrain", "eval", run, "eval.batches=1"], capture_output=True,
                           text=True, env=_env(), timeout=300, **kw)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        for d, dirs, _ in os.walk(run):
            os.chmod(d, 0o755)


@contextlib.contextmanager
def _disk_full_for(fragment):
    """DCP's file streams under a path containing ``fragment`` raise ENOSPC on write, as a full disk does."""
    from torch.distributed.checkpoint import filesystem as fsmod
    real = fsmod.FileSystem.create_stream

    class Full:
        def __init__(self, stream):
            self._stream = stream

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._stream, name)

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            yield Full(stream) if fragment in str(path) and "w" in mode else stream
    fsmod.FileSystem.create_stream = create_stream
    try:
        yield
    finally:
        fsmod.FileSystem.create_stream = real


def test_a_full_disk_during_a_save_stops_with_the_old_checkpoints_intact(tmp_path, capsys):
    run = str(tmp_path / "run")
    with _disk_full_for("step_00000004.tmp"):
        rc, err = train(run, "train.steps=6", "checkpoint.every=2", capsys=capsys)
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert f"disk full while writing checkpoint {run}/checkpoints/step_00000004" in line, err[-3000:]
    assert "No space left on device" in line and "GiB free" in line and "untouched" in line
    assert steps(run) == [2] and verify(os.path.join(run, "checkpoints", "step_00000002")) is None
    assert not [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.endswith(".tmp")]
    rc, err = train(run, "train.steps=6", "checkpoint.every=2", capsys=capsys)  # space freed: it resumes
    assert rc == 0 and steps(run) == [2, 4, 6], err


# ---------------------------------------------------------------------------------------------------------------------
# manifests and tokenizers that point elsewhere


def _rewrite_manifest(ckpt, edit):
    path = os.path.join(ckpt, "manifest.json")
    with open(path) as fh:
        m = json.load(fh)
    edit(m)
    with open(path, "w") as fh:
        json.dump(m, fh)


def _mdtrain_eval(path, timeout=120):
    return subprocess.run([sys.executable, "-m", "mdtrain", "eval", path, "eval.batches=1"], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


def test_a_manifest_must_list_the_checkpoints_own_regular_files(finished, tmp_path, capsys):
    cases = {
        "empty": (lambda c: _rewrite_manifest(c, lambda m: m.update(files={})), "manifest.json lists no files"),
        "outside": (lambda c: _rewrite_manifest(c, lambda m: m["files"].update(
            {"../../../../etc/hostname": {"size": os.path.getsize("/etc/hostname"),
                                          "sha256": file_sha256("/etc/hostname")}})),
            "which is not a file inside the checkpoint"),
        "unlisted": (lambda c: open(os.path.join(c, "dcp", "__9_0.distcp"), "wb").close(),
                     "dcp/__9_0.distcp is not listed in manifest.json"),
    }
    for name, (damage, message) in cases.items():
        run = copy_run(finished, tmp_path / name)
        ckpt = os.path.join(run, "checkpoints", "step_00000004")
        damage(ckpt)
        capsys.readouterr()
        assert cli.main(["eval", ckpt, "eval.batches=1"]) == 1, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (name, err)


def test_a_device_in_place_of_a_checkpoint_file_is_refused_instead_of_read_forever(finished, tmp_path):
    """/dev/zero behind a manifest entry whose size matches (0): hashing or loading it would never end."""
    run = copy_run(finished, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints", "step_00000004")
    client = os.path.join(ckpt, "client", "rank_00000.pt")
    os.unlink(client)
    os.symlink("/dev/zero", client)
    _rewrite_manifest(ckpt, lambda m: m["files"]["client/rank_00000.pt"].update(size=0, sha256="0" * 64))
    r = _mdtrain_eval(ckpt)
    assert r.returncode == 1 and "client/rank_00000.pt is not a regular file" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "mdtrain", "train", *TINY, f"train.run_dir={run}", "train.steps=6",
                        "checkpoint.verify=sha256"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and "step_00000004 is not usable: client/rank_00000.pt is not a regular file" in r.stdout
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout


def test_tokenizer_and_data_paths_must_stay_inside_their_directory(finished, tmp_path, capsys):
    from mdtrain.data.errors import DataError
    from mdtrain.data.shards import read_manifest as read_data_manifest
    from mdtrain.data.tokenizers import load_tokenizer
    run = copy_run(finished, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints", "step_00000004")
    meta_path = os.path.join(ckpt, "tokenizer", "mdtrain_tokenizer.json")
    meta = json.load(open(meta_path))
    meta.update(kind="sentencepiece", model_file="../../../config.yaml")
    json.dump(meta, open(meta_path, "w"))
    _rewrite_manifest(ckpt, lambda m: m["files"]["tokenizer/mdtrain_tokenizer.json"].update(
        size=os.path.getsize(meta_path), sha256=file_sha256(meta_path)))
    with pytest.raises(DataError, match=r"model_file '\.\./\.\./\.\./config\.yaml' is not a file of"):
        load_tokenizer(os.path.join(ckpt, "tokenizer"))
    capsys.readouterr()
    assert cli.main(["eval", ckpt, "eval.batches=1"]) == 1
    assert "is not a file of" in capsys.readouterr().err

    data = tmp_path / "data"
    data.mkdir()
    json.dump({"format": "mdtrain-shards", "version": 1, "seq_len": 32, "tokenizer": "../elsewhere", "dtype": "uint16",
               "splits": {"train": {"shards": [], "num_samples": 0}, "valid": {"shards": [], "num_samples": 0}}},
              open(data / "manifest.json", "w"))
    with pytest.raises(DataError, match=r"tokenizer '\.\./elsewhere' is not a directory inside"):
        read_data_manifest(str(data))
