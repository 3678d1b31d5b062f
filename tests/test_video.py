"""Video: the data layer (mp4, y4m, raw YUV, PNG frames), the DHVC codec and its
bitstream, the classic anchors, training (resume) and the evaluation plug-in.

Fixtures are tiny clips written here in their real formats; nothing is downloaded.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clbench.codecs import CorruptDataError, get_codec
from clbench.codecs.video import pack_sequence, unpack_sequence
from clbench.datasets.video import (
    PseudoVideo,
    VideoClips,
    crop_frames,
    find_videos,
    pad_frames,
    read_video,
)
from clbench.errors import ClbenchError, DataNotFoundError

TINY = "widths=8/8,zdims=4/4,enc_blocks=1,tcp_blocks=1,head_blocks=1"


def synthetic_clip(t: int = 8, h: int = 32, w: int = 32) -> np.ndarray:
    """Smooth moving content: a gradient and a square drifting one pixel per frame."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for k in range(t):
        f = np.stack([(xx * 6 + k * 4) % 256, (yy * 6) % 256, np.full_like(xx, 90)], -1)
        f[8 + k // 2 : 16 + k // 2, 4 + k : 12 + k] = (230, 40, 40)
        frames.append(f.astype(np.uint8))
    return np.stack(frames)


def rgb_to_yuv420(frame: np.ndarray) -> bytes:
    """8-bit planar 4:2:0 (BT.601 limited range, what swscale assumes for untagged data)."""
    f = frame.astype(np.float64)
    y = 16 + (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255
    cb = 128 + (-37.797 * f[..., 0] - 74.203 * f[..., 1] + 112.0 * f[..., 2]) / 255
    cr = 128 + (112.0 * f[..., 0] - 93.786 * f[..., 1] - 18.214 * f[..., 2]) / 255
    h, w = y.shape

    def sub(c):
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y, sub(cb), sub(cr)]
    return b"".join(np.clip(np.round(p), 0, 255).astype(np.uint8).tobytes() for p in planes)


def write_y4m(path: Path, clip: np.ndarray) -> None:
    h, w = clip.shape[1:3]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        for fr in clip:
            f.write(b"FRAME\n" + rgb_to_yuv420(fr))


def write_mp4(path: Path, clip: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25, 1))
        s.width, s.height, s.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        s.options = {"crf": "10"}
        for fr in clip:
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return synthetic_clip()


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("video")
    out = {"mp4": d / "clip.mp4", "y4m": d / "clip.y4m", "yuv": d / "clip_32x32_25.yuv"}
    write_mp4(out["mp4"], clip)
    write_y4m(out["y4m"], clip)
    out["yuv"].write_bytes(b"".join(rgb_to_yuv420(f) for f in clip))
    frames = d / "seq" / "0001"
    frames.mkdir(parents=True)
    for k, f in enumerate(clip):
        Image.fromarray(f).save(frames / f"im{k + 1}.png")
    out["png"] = frames
    return out


# ---------------------------------------------------------------------------------------
# data layer


@pytest.mark.parametrize("layout", ["mp4", "y4m", "yuv", "png"])
def test_every_layout_reads_the_clip(files, clip, layout):
    v = read_video(files[layout])
    assert v.shape == (8, 32, 32, 3) and v.dtype == np.uint8
    err = np.abs(v.astype(int) - clip).mean()
    assert err == 0 if layout == "png" else err < 6  # 4:2:0 and the codec cost a little


def test_y4m_and_raw_yuv_decode_to_the_same_pixels(files):
    assert np.array_equal(read_video(files["y4m"]), read_video(files["yuv"]))


def test_find_videos_lists_files_and_frame_folders(files):
    found = find_videos(files["mp4"].parent)
    assert files["png"] in found and files["mp4"] in found and files["y4m"] in found


def test_missing_and_undecodable_files_name_themselves(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00junk" * 50)
    with pytest.raises(ClbenchError, match="broken.mp4") as e:
        read_video(bad)
    assert "\n" not in str(e.value)
    wrong = tmp_path / "cut_32x32.yuv"
    wrong.write_bytes(b"\x80" * 1000)
    with pytest.raises(ClbenchError, match="cut_32x32.yuv.*not a whole number"):
        read_video(wrong)


def test_clips_sampling_cropping_and_too_short(files):
    c = VideoClips([files["y4m"]], frames=3, stride=2, hop=1, crop=16)
    assert len(c) == 8 - 4  # starts 0..3: frames s, s+2, s+4
    assert c[0].shape == (3, 16, 16, 3)
    whole = VideoClips([files["y4m"]], frames=4, hop=4)
    assert len(whole) == 2 and whole[1].shape == (4, 32, 32, 3)
    with pytest.raises(ClbenchError, match=r"clip.y4m has 8 frames.*clip of 5 frames 2 apart"):
        VideoClips([files["y4m"]], frames=5, stride=2)


def test_pseudo_video_slides_inside_the_still(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    torch.manual_seed(0)
    v = PseudoVideo(tmp_path, frames=4, crop=24, max_speed=3.0)[0]
    assert v.shape == (4, 24, 24, 3)
    # every frame is a window of the still
    for f in v:
        hits = [
            (y, x)
            for y in range(40 - 23)
            for x in range(48 - 23)
            if np.array_equal(img[y : y + 24, x : x + 24], f)
        ]
        assert hits


def test_odd_sizes_pad_and_crop_back():
    f = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(1, 5, 7, 3)
    p, hw = pad_frames(f, 4)
    assert p.shape == (1, 8, 8, 3) and hw == (5, 7)
    assert np.array_equal(p[:, 5:, :7], np.repeat(f[:, 4:5], 3, axis=1))  # edge replicated
    assert np.array_equal(crop_frames(p, hw), f)


def test_video_dataset_in_the_registry(files):
    from clbench.datasets import load_dataset

    root = files["mp4"].parent
    train, test = load_dataset("video", root, train=["clip.y4m"], test=["clip.mp4"], size=16)
    assert train.images.shape == (8, 16, 16, 3) and test.classes == ["frame"]
    assert test.meta["clips"] == [{"clip": "clip.mp4", "first": 0, "frames": 8}]


# ---------------------------------------------------------------------------------------
# the DHVC codec


def dhvc(**opts) -> object:
    spec = f"dhvc:pretrained=false,{TINY}," + ",".join(f"{k}={v}" for k, v in opts.items())
    return get_codec(spec.rstrip(","))


def sharpen(codec) -> None:
    """Scale the posterior so latents are non-zero after rounding: a random model's are
    all zero, which would make progressive decoding trivially equal to full decoding."""
    from clbench.codecs.dhvc import fingerprint

    with torch.no_grad():
        for blk in codec.model.latents:
            blk.post_out.weight.mul_(20.0)
    codec.fingerprint = fingerprint(codec.model)


@pytest.mark.parametrize("size", [(32, 32), (27, 30)])
def test_dhvc_round_trip_is_exact(clip, size):
    c = dhvc(q=3, gop=4)
    sharpen(c)
    frames = clip[:, : size[0], : size[1]]
    data, recon = c.encode_with_reconstruction(frames)
    assert len(data) == 8
    decoded = c.decode_video(data)
    assert decoded.shape == frames.shape
    assert np.array_equal(decoded, recon)  # the decoder reproduces the encoder exactly
    intra = [b[3] & 1 for b in data]  # flags byte after magic and version
    assert intra == [1, 0, 0, 0, 1, 0, 0, 0]


def test_dhvc_temporal_context_changes_the_prediction(clip):
    inter, intra = dhvc(q=3, gop=8), dhvc(q=3, gop=1)
    sharpen(inter)
    sharpen(intra)
    a, b = inter.encode_video(clip), intra.encode_video(clip)
    assert a[0] == b[0]  # frame 0 is intra in both
    assert a[1:] != b[1:]  # later frames: context from previous frames vs none


def test_dhvc_progressive_decoding_gives_a_coarse_frame(clip):
    full = dhvc(q=3, gop=8)
    sharpen(full)
    data = full.encode_video(clip)
    coarse = dhvc(q=3, gop=8, scales=1)
    coarse.model.load_state_dict(full.model.state_dict())
    coarse.fingerprint = full.fingerprint
    a, b = full.decode_video(data), coarse.decode_video(data)
    assert b.shape == a.shape and not np.array_equal(a, b)
    # encoding with scales=1 sends only the coarse scale; any decoder of the model reads it
    sent = coarse.encode_video(clip)
    assert sum(map(len, sent)) < sum(map(len, data))
    assert np.array_equal(full.decode_video(sent), b)


def test_training_truncated_decode_is_what_a_progressive_receiver_sees(clip):
    """``forward_frame(keep=k)`` (the progressive training term) reconstructs an intra
    frame exactly as the codec's decoder does from a packet with only k scales."""
    c = dhvc(q=3, gop=8, scales=1)
    sharpen(c)
    received = c.decode_video(c.encode_video(clip[:1]))[0]
    m = c.model.eval()
    with torch.inference_mode():
        lm = torch.tensor([c.lmbda])
        r = m.forward_frame(c._tensor(clip[0]), m.initial_refs(1), lm, keep=1)
        full = m.forward_frame(c._tensor(clip[0]), m.initial_refs(1), lm)
    assert torch.equal(r["x_hat"], full["x_hat"]) and "x_hat_coarse" not in full
    assert np.array_equal(c._image(r["x_hat_coarse"], 32, 32), received)
    assert not np.array_equal(c._image(r["x_hat"], 32, 32), received)


def test_dhvc_variable_rate_from_one_model(clip):
    from clbench.codecs.dhvc import unpack_frame

    coded = []
    for q in (0, 5):
        c = dhvc(q=q, gop=8)
        sharpen(c)
        data, recon = c.encode_with_reconstruction(clip)
        coded.append(([unpack_frame(b, t)["strings"] for t, b in enumerate(data)], recon))
    # one model: the lambda embedding changes the latents' coding and the reconstruction
    assert coded[0][0] != coded[1][0]
    assert not np.array_equal(coded[0][1], coded[1][1])


def test_dhvc_bitstream_errors_name_the_problem(clip):
    c = dhvc(q=2, gop=8)
    sharpen(c)
    data = c.encode_video(clip[:3])
    q4 = dhvc(q=4, gop=8)
    sharpen(q4)
    with pytest.raises(CorruptDataError, match="frame 0 was coded at q=2, this codec decodes q=4"):
        q4.decode_video(data)
    other = dhvc(q=2, gop=8, seed=1)
    with pytest.raises(CorruptDataError, match="frame 0 was coded by another model"):
        other.decode_video(data)
    with pytest.raises(CorruptDataError, match="frame 2 is truncated mid-frame"):
        c.decode_video([data[0], data[1], data[2][: len(data[2]) // 2]])
    with pytest.raises(CorruptDataError, match="frame 1 carries frame index 2"):
        c.decode_video([data[0], data[2]])
    seq = pack_sequence(data)
    assert unpack_sequence(seq) == data
    with pytest.raises(CorruptDataError, match="truncated in frame 2 of 3"):
        unpack_sequence(seq[:-5])


def test_dhvc_bad_options_are_one_line():
    with pytest.raises(ClbenchError, match="no published weights"):
        get_codec("dhvc:q=1")
    with pytest.raises(ClbenchError, match="q=9 is invalid"):
        dhvc(q=9)
    with pytest.raises(ClbenchError, match="unknown option 'width'"):
        get_codec("dhvc:pretrained=false,width=3")


# ---------------------------------------------------------------------------------------
# classic anchors


@pytest.mark.parametrize("spec", ["x264:crf=20", "x265:crf=20", "vp9:crf=20", "svtav1:crf=20"])
def test_classic_anchor_round_trip(clip, spec):
    c = get_codec(spec + ",gop=4,threads=1")
    frames = clip[:6, :30, :31]  # odd width: padded to even for 4:2:0 and cropped back
    data = c.encode(frames)
    assert len(data) == 6
    out = c.decode_video(data)
    assert out.shape == frames.shape
    mse = np.mean((out.astype(float) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 24


def test_classic_anchor_truncated_stream_is_one_line(clip):
    c = get_codec("vp9:crf=30,gop=8,threads=1")
    data = c.encode(clip[:4])
    with pytest.raises(CorruptDataError, match="frame 2"):
        c.decode([data[0], data[1], data[2][:3], data[3]])


# ---------------------------------------------------------------------------------------
# training and evaluation


def _train(tmp_path, files, steps, out, resume=False, **kw):
    from clbench.codecs.video_train import VideoTrainConfig, train_video

    stills = tmp_path / "stills"
    if not stills.is_dir():
        stills.mkdir()
        for k in range(4):
            Image.fromarray(synthetic_clip(1, 40, 40)[0][:, ::-1] if k % 2 else synthetic_clip(1, 40, 40)[0]).save(stills / f"{k}.png")  # fmt: skip
    cfg = VideoTrainConfig(
        out=str(out),
        clips=[str(files["y4m"])],
        stills=[str(stills)],
        val_stills=[str(stills)],
        arch={"widths": [8, 8], "zdims": [4, 4], "head_blocks": 1},
        steps=steps,
        frames=3,
        crop=16,
        batch_size=2,
        val_every=100,
        val_items=2,
        ckpt_every=2,
        threads=1,
        **kw,
    )
    return train_video(cfg, resume=resume, progress=False)


def test_training_resumes_exactly_and_makes_a_codec(tmp_path, files, clip):
    _train(tmp_path, files, 4, tmp_path / "a")
    _train(tmp_path, files, 2, tmp_path / "b")
    rec = _train(tmp_path, files, 4, tmp_path / "b", resume=True)
    a = torch.load(tmp_path / "a" / "last.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rec["step"] == 4 and "q0" in rec
    log = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert log["complete"] and log["best_val"] == min(r["loss"] for r in log["history"])
    assert {"git_commit", "cpu"} <= set(log["provenance"])
    again = _train(tmp_path, files, 4, tmp_path / "b", resume=True)  # finished: a no-op
    c2 = torch.load(tmp_path / "b" / "last.pth", weights_only=True)["state_dict"]
    assert again == rec and all(torch.equal(a[k], c2[k]) for k in a)
    c = get_codec(f"dhvc:checkpoint={tmp_path / 'b' / 'best.pth'},q=1,gop=4")
    data = c.encode(clip[:3])
    assert c.decode_video(data).shape == (3, 32, 32, 3)
    with pytest.raises(ClbenchError, match="already holds a run"):
        _train(tmp_path, files, 4, tmp_path / "b")


def test_progressive_training_term_trains_and_logs_each_truncated_decode(tmp_path, files):
    from clbench.codecs.video_train import VideoTrainConfig

    a = _train(tmp_path, files, 2, tmp_path / "p0")
    b = _train(tmp_path, files, 2, tmp_path / "p1", progressive=1.0)
    assert "psnr_1_scales" in b["q0"] and "psnr_1_scales" not in a["q0"]
    wa = torch.load(tmp_path / "p0" / "last.pth", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "p1" / "last.pth", weights_only=True)["state_dict"]
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the term reaches the gradients
    with pytest.raises(ClbenchError, match="--progressive must be >= 0"):
        VideoTrainConfig(out="x", stills=["s"], steps=1, progressive=-1).check()


def test_init_fine_tunes_from_a_checkpoint_and_refuses_bad_ones(tmp_path, files):
    from clbench.codecs.video_train import VideoTrainConfig, train_video

    _train(tmp_path, files, 2, tmp_path / "base")
    start = tmp_path / "base" / "best.pth"
    _train(tmp_path, files, 1, tmp_path / "ft", init=str(start), lr=0.0)  # lr 0: weights kept
    a = torch.load(start, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ft" / "last.pth", weights_only=True)
    assert all(torch.equal(a[k], b["state_dict"][k]) for k in a)
    assert b["clbench"]["step"] == 1 and b["clbench"]["config"]["init"] == str(start)
    _train(tmp_path, files, 2, tmp_path / "ft", init=str(start), lr=0.0, resume=True)

    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    bad = [
        (str(tmp_path / "nope.pth"), {}, "does not exist"),
        (str(tmp_path / "other.pth"), {}, "is not a DHVC checkpoint"),
        (str(start), {"widths": [16, 16]}, "drop --arch"),
    ]
    for init, arch, msg in bad:
        cfg = VideoTrainConfig(out=str(tmp_path / "x"), stills=["s"], steps=1, init=init, arch=arch)
        with pytest.raises(ClbenchError, match=msg):
            train_video(cfg, progress=False)
    assert not (tmp_path / "x").exists()


def test_training_refuses_clips_shorter_than_t_before_writing(tmp_path, files):
    from clbench.codecs.video_train import VideoTrainConfig, train_video

    cfg = VideoTrainConfig(out=str(tmp_path / "r"), clips=[str(files["y4m"])], frames=9, steps=1)
    with pytest.raises(ClbenchError, match="has 8 frames"):
        train_video(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_video_evaluation_writes_per_frame_rd_and_bd(tmp_path, files):
    from clbench.cli import main

    bench = tmp_path / "video-tiny.yaml"
    bench.write_text(
        "source: video\n"
        "images: clip.y4m\n"
        "source_options: {frames: 6}\n"
        "metrics: [psnr, psnr-yuv]\n"
        "anchor: x264\n"
        "curves:\n"
        "  x264: 'x264:crf=[20,30,40],gop=6,threads=1'\n"
        "  vp9: 'vp9:crf=[20,35,50],gop=6,threads=1'\n"
        f"  dhvc: 'dhvc:pretrained=false,{TINY},q=[1,4]'\n"
        "complexity: {size: [32, 32], latency_size: [32, 32], repeats: 1}\n"
    )
    out = tmp_path / "res"
    root = files["y4m"].parent
    rc = main(["codec", "eval", str(bench), "--data-root", str(root), "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    frames = (out / "per_frame.csv").read_text().splitlines()
    assert len(frames) == 1 + 6 * (3 + 3 + 2) and "psnr_yuv" in frames[0]
    x264 = next(c for c in res["curves"] if c["label"] == "x264")
    assert all(p["psnr_yuv"] > 20 for p in x264["points"])
    assert any(r["curve"] == "vp9" for r in res["bd_rate"])


def test_video_evaluation_missing_clip_is_one_line(tmp_path, capsys):
    from clbench.cli import main

    bench = tmp_path / "video-missing.yaml"
    bench.write_text("source: video\nimages: gone.mp4\ncurves: {x264: 'x264:crf=30'}\n")
    rc = main(["codec", "eval", str(bench), "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "gone.mp4" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_psnr_yuv_weights_planes_six_one_one():
    from clbench.codecs.evaluation.video import psnr_yuv

    a = np.full((4, 4, 3), 100, np.uint8)
    b = a.copy()
    b[..., :] = 110  # grey shift: luma moves by 10, chroma not at all
    p = psnr_yuv(a, b)
    assert p["psnr_u"] == np.inf or p["psnr_u"] > 60
    assert abs(p["psnr_y"] - 10 * np.log10(255**2 / 100)) < 1e-6
