"""The benchmarks that run the project's own commands in processes of their own (``multitask bench``): training
memory as the data grows, ``predict``'s pace on new photos, and the first checks on a GPU machine."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch


MEMORY_PEOPLE = (150, 600)  # synthetic persons (7 photos each) of the two trainings whose memory is compared


def training_memory(overrides, size: str) -> dict:
    """Peak resident memory of a short training (one fold, one epoch per stage, its own process) on the synthetic
    faces of MEMORY_PEOPLE persons, so that the growth with the data is visible."""
    import tempfile

    h, w = (int(v) for v in size.split("x"))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for people in MEMORY_PEOPLE:
            cmd = [sys.executable, "-m", "multitask.train", "experiment=quick", "cv.run_folds=[0]",
                   f"data.synthetic.people={people}", "data.synthetic.unmasked=0", f"data.size=[{h},{w}]",
                   f"data.cache_dir={tmp}/cache", f"out_dir={tmp}/runs", "train.progress=false", *overrides]
            with open(f"{tmp}/stderr-{people}.txt", "w+") as err:  # a file, not a pipe: a full pipe would block
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
                peaks = resident_peaks(proc.pid)
                proc.wait()
                err.seek(0)
                error = err.read().strip().splitlines()[-1:] if proc.returncode else []
            out[people * 7] = {**peaks(), "error": error}
    if any(r["error"] for r in out.values()):
        return {**out, "summary": "failed: " + "; ".join(e for r in out.values() for e in r["error"])}
    (n1, r1), (n2, r2) = out.items()
    per = (r2["peak_mb"] - r1["peak_mb"]) / (n2 - n1)
    parts = lambda r: f"{r['peak_mb']:.0f} MB ({r['anon_mb']:.0f} own, {r['file_mb']:.0f} mapped files)"  # noqa
    return {**out, "mb_per_1000_photos": per * 1000,
            "summary": f"peak resident memory {parts(r1)} with {n1} photos, {parts(r2)} with {n2} "
                       f"({per * 1000:.0f} MB more per 1,000 photos)"}


def proc_status(pid) -> dict:
    """/proc/PID/status (``pid`` "self": this process) as field -> text."""
    status = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":", 1) for line in status.splitlines() if ":" in line)


def kib(field: str) -> int:
    """A /proc status size ("1234 kB") in KiB."""
    return int(field.split()[0])


def resident_peaks(pid: int, every: float = 0.2) -> Callable[[], dict]:
    """Samples a process's resident memory in a thread until it ends; the returned call gives the peaks of the
    whole (VmHWM, the kernel's high-water mark since the command started), of its own memory (RssAnon: arrays,
    activations, the heap) and of mapped files (RssFile: libraries, mapped data). Not ru_maxrss: that of a child
    forked from a large parent starts at the parent's resident size, and outlives the child's exec."""
    import threading

    peaks = {"peak_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0}

    def sample() -> None:
        while True:
            try:
                fields = proc_status(pid)
            except OSError:
                return
            if "RssAnon" not in fields or fields.get("State", "").strip().startswith("Z"):
                return
            for key, name in (("VmHWM", "peak_mb"), ("RssAnon", "anon_mb"), ("RssFile", "file_mb")):
                peaks[name] = max(peaks[name], kib(fields[key]) / 1024)
            time.sleep(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return lambda: (thread.join(), dict(peaks))[1]


PREDICT_PEOPLE = 150  # synthetic persons (7 portraits of 384 x 512 each) that predict meets for the first time


def detector_run(tmp: str, overrides, size: str) -> Path:
    """A one-epoch quick run under the detector face crop with experiment=real_faces' 6 test-time views (its
    speed is a trained model's); a RuntimeError with the command's last line when it fails."""
    h, w = (int(v) for v in size.split("x"))
    cmd = [sys.executable, "-m", "multitask.train", "experiment=quick", "cv.run_folds=[0]", f"out_dir={tmp}/runs",
           f"data.cache_dir={tmp}/cache", "train.progress=false", "data.face_crop=detector",
           "predict.tta_scales=[0.9,1.1]", *overrides, f"data.size=[{h},{w}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(last_line(proc.stderr, "no output")[:160])
    return next(Path(tmp, "runs").iterdir())


def predict_pace(overrides, size: str) -> dict:
    """``multitask predict``'s path end to end on new photos (nothing cached) with one fold model and the 6
    test-time views of experiment=real_faces under the detector face crop: photos/s and the seconds of each step
    (faces found, photos decoded and framed, the network)."""
    import tempfile

    from multitask.api import load_run
    from multitask.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = detector_run(tmp, overrides, size)
        except RuntimeError as e:
            return {"summary": f"not measured ({e})"}
        generate(Path(tmp, "new"), PREDICT_PEOPLE, seed=1)
        paths = sorted(str(p) for p in Path(tmp, "new").rglob("*.jpg"))
        predictor = load_run(run, folds=[0])
        views = len(predictor.members[0].views)
        start = time.perf_counter()
        prepared = predictor.frame_files(paths)
        predictor.predict_framed(prepared.images, pd.DataFrame({"path": paths}))
        wall = time.perf_counter() - start
    steps = ", ".join(f"{step} {s / len(paths) * 1000:.1f}" for step, s in predictor.seconds.items())
    return {"photos": len(paths), "views": views, "photos_per_s": len(paths) / wall, "seconds": predictor.seconds,
            "summary": f"{len(paths) / wall:.1f} photos/s for {len(paths)} new 384x512 photos, one model x {views} "
                       f"views (ms per photo: {steps})"}


SCENE_FACES = (1, 5, 20)  # faces pasted per 1280 x 720 scene
SCENES_EACH = 6


def scene_pace(overrides, size: str) -> dict:
    """``predict --faces all`` on synthetic 1280 x 720 scenes of 1, 5 and 20 faces (40-160 px wide) and on a
    640 x 360 video: photos/s and faces/s with the time split (detect, cut, network), the same model as
    ``predict_pace``. The detector keeps only some drawn faces: faces/s counts the faces it kept."""
    import tempfile

    import cv2

    from multitask.api import load_run
    from multitask.data.images import read_rgb
    from multitask.data.scenes import generate_scenes
    from multitask.predict import predict

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = detector_run(tmp, overrides, size)
        except RuntimeError as e:
            return {"summary": f"not measured ({e})"}
        for n in SCENE_FACES:
            scenes = generate_scenes(Path(tmp, f"scenes{n}"), SCENES_EACH, (1280, 720), seed=n, counts=(n,),
                                     widths=(40, 160))
            rgbs = [read_rgb(p) for p in sorted((scenes / "images").glob("*.jpg"))]
            predictor = load_run(run, folds=[0])
            predictor.predict_faces(rgbs[:1], ["warm-up"])
            predictor.seconds.clear()
            start = time.perf_counter()
            rows = predictor.predict_faces(rgbs, [str(i) for i in range(len(rgbs))])
            wall = time.perf_counter() - start
            faces = int((rows["face_status"] == "predicted").sum())
            out[n] = {"photos_per_s": len(rgbs) / wall, "faces": faces, "faces_per_s": faces / wall,
                      "ms_per_photo": {k: v / len(rgbs) * 1000 for k, v in predictor.seconds.items()}}
        video = Path(tmp, "clip.mp4")
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (640, 360))
        for p in sorted((Path(tmp, "scenes5") / "images").glob("*.jpg")) * 4:
            writer.write(cv2.resize(cv2.imread(str(p)), (640, 360), interpolation=cv2.INTER_AREA))
        writer.release()
        start = time.perf_counter()
        rows = predict(run, video, Path(tmp, "video-out"), folds=[0], progress=False, log=lambda s: None,
                       faces="all", fps=10)
        out["video_frames_per_s"] = rows["frame"].nunique() / (time.perf_counter() - start)
    split = lambda r: ", ".join(f"{k} {v:.0f}" for k, v in r["ms_per_photo"].items())  # noqa: E731
    lines = [f"{n} face(s): {out[n]['photos_per_s']:.1f} photos/s, {out[n]['faces_per_s']:.1f} faces/s "
             f"({out[n]['faces']} kept; ms per photo: {split(out[n])})" for n in SCENE_FACES]
    return {**out, "summary": "; ".join(lines) + f"; video 640x360: {out['video_frames_per_s']:.1f} frames/s"}


def gpu_check(overrides) -> int:
    """The first checks on a GPU machine, one line each: PASS, FAIL (with the last line the command printed) or
    SKIP (and why). Exit code 1 when one failed."""
    import tempfile

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    quick = ["experiment=quick", "cv.run_folds=[0]", "train.progress=false", *overrides]
    cli_train = [sys.executable, "-m", "multitask.train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "multitask.train"]
    with tempfile.TemporaryDirectory() as tmp:
        checks = [
            ("CUDA device", None, f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}" if gpus else None),
            ("quick run, 1 GPU", cli_train + quick + ["train.device=cuda", f"out_dir={tmp}/gpu1"], gpus >= 1),
            ("torchrun, 2 GPUs (NCCL)", torchrun + quick + ["train.device=cuda", f"out_dir={tmp}/gpu2"], gpus >= 2),
            ("quick run, CPU", cli_train + quick + ["train.device=cpu", f"out_dir={tmp}/cpu1"], True),
            ("torchrun, 2 CPU processes (gloo)", torchrun + quick + ["train.device=cpu", f"out_dir={tmp}/cpu2"], True),
        ]
        failed = 0
        for name, command, ready in checks:
            if command is None:
                print(f"{'PASS' if ready else 'SKIP'} {name}: {ready or 'no CUDA device visible to torch'}")
                continue
            if not ready:
                print(f"SKIP {name}: needs {'two GPUs' if '2 GPUs' in name else 'a GPU'}")
                continue
            tick = time.perf_counter()
            out = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                                 env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
                                 if "torchrun" in name else None)
            last = last_line(out.stdout, "") if out.returncode == 0 else last_line(out.stderr, "(no output)")
            failed += out.returncode != 0
            print(f"{'PASS' if out.returncode == 0 else 'FAIL'} {name} ({time.perf_counter() - tick:.0f} s): "
                  f"{last.split('. Report:')[0][:200]}")
    return 1 if failed else 0


def last_line(text: str, empty: str) -> str:
    """The last line a command printed (what it died of), or ``empty``."""
    return (text.strip().splitlines() or [empty])[-1]
