"""`qpert data fetch` / `verify` end to end on the offline stand-in mirror (qpert.synthetic.mirror), served
from a folder or by a local HTTP server with the faults real servers have (helpers/data_server.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers.bench import run_in_process
from helpers.data_server import DataServer, closed_port
from helpers.disk import full_disk_for

from qpert.data.box_sources import coco_entities_boxes, flickr30k_entities_boxes
from qpert.data.datasets import load_dataset
from qpert.data.fetch import MIRROR_ENV, FetchError, fetch_data, verify_data
from qpert.data.fetch.checks import check_image
from qpert.data.layout import DataLayout
from qpert.synthetic.mirror import write_mirror
from qpert.synthetic.scenes import make_scenes

EXTRA = 30  # images per archive that no annotation names: partial fetch reads a fraction of the archive
SEED = 2000
REAL_FG = Path(__file__).resolve().parents[2] / "shared" / "data" / "fg"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mirror")
    write_mirror(folder, extra=EXTRA, seed=SEED)
    return folder


@pytest.fixture
def server(mirror):
    with DataServer(mirror) as running:
        yield running


@pytest.fixture
def fetch(mirror):
    """fetch_data from ``source`` (the mirror folder or a server's URL) with the stand-ins' catalog."""

    def run(names, root, source, **options):
        catalog = mirror / "qpert-catalog.json"
        return fetch_data(names, root, mirror=str(source), catalog=catalog, progress=False, **options)

    return run


def data_cli(monkeypatch, capsys, *args):
    """`qpert data ARGS` through cli.main(), in this process."""
    return run_in_process(monkeypatch, capsys, "data", *args)


def error_lines(run) -> list[str]:
    assert "Traceback" not in run.stderr
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def member_bytes(archive: Path, name: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        return z.read(name)


def member_data_offset(archive: Path, name: str) -> int:
    """An offset inside ``name``'s data in the archive (for the server to corrupt)."""
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(name)
    return info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2


def test_flickr30k_through_an_http_mirror_loads_and_reads_only_the_named_images(fetch, tmp_path, server, mirror):
    report = fetch(["flickr30k"], tmp_path, server.url)
    layout = DataLayout(tmp_path)
    dataset = load_dataset("flickr30k", tmp_path, "test")
    scenes = make_scenes(SEED, 8 + 6 + EXTRA)
    assert dataset.image_ids == [s.image_id for s in scenes[:8]]
    assert load_dataset("flickr30k", tmp_path, "val").num_images == 6
    boxes = flickr30k_entities_boxes(layout.entities_annotations, dataset.image_ids)
    for scene in scenes[:8]:
        np.testing.assert_array_equal(boxes[scene.image_id].boxes, scene.boxes)
    # the 14 named images, none of the 30 others; the archive was read by range requests, a fraction of it
    written = sorted(p.name for p in layout.image_folder("flickr30k").iterdir())
    assert written == sorted(f"{s.image_id}.jpg" for s in scenes[:14])
    name = "flickr30k-images/s2000_000003.jpg"
    assert (layout.images_dir("flickr30k") / name).read_bytes() == member_bytes(mirror / "flickr30k-images.zip", name)
    zip_size = (mirror / "flickr30k-images.zip").stat().st_size
    requests = server.requests("flickr30k-images.zip")
    assert all(r.status == 206 for r in requests) and server.sent("flickr30k-images.zip") < 0.5 * zip_size
    assert len(list(layout.entities_sentences.iterdir())) == 14
    assert not layout.downloads.exists() and not list(tmp_path.rglob("*.zip"))
    manifest = json.loads(layout.manifest.read_text())["datasets"]["flickr30k"]
    entry = manifest[f"flickr30k/images/{name}"]
    assert entry["sha256"] == hashlib.sha256((layout.images_dir("flickr30k") / name).read_bytes()).hexdigest()
    assert entry["member"] == name and entry["url"] == f"{server.url}/flickr30k-images.zip"
    assert len(report.fetched) == len(manifest) == 2 + 14 + 28


def test_every_name_from_a_local_mirror_folder_reads_archives_in_place(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    report = fetch_data(["all"], tmp_path, catalog=mirror / "qpert-catalog.json", progress=False)
    layout = DataLayout(tmp_path)
    coco = load_dataset("coco", tmp_path, "test")
    assert coco.image_ids[0] == "100000" and coco.num_images == 8 and load_dataset("coco", tmp_path, "val").num_images
    boxes = coco_entities_boxes(layout.coco_entities, coco.image_ids, dict(zip(coco.image_ids, coco.image_paths)))
    assert boxes.num_without_boxes == 0
    fg = load_dataset("flickr30k-fg", tmp_path, "test")
    assert fg.texts[0] != load_dataset("flickr30k", tmp_path, "test").texts[0]
    assert load_dataset("coco-fg", tmp_path, "test").num_images == 8
    assert len(list(layout.image_folder("coco").iterdir())) == 14 and not list(tmp_path.rglob("*.zip"))
    assert sorted(json.loads(layout.manifest.read_text())["datasets"]) == ["coco", "coco-entities", "fg", "flickr30k"]
    assert report.bytes_received == 0


def test_a_rerun_asks_for_nothing_and_a_deleted_file_alone_is_fetched_again(fetch, tmp_path, server):
    first = fetch(["all"], tmp_path, server.url)
    assert len(first.fetched) == (2 + 14 + 28) + (2 + 14) + 1 + 2
    server.log.clear()
    again = fetch(["all"], tmp_path, server.url)
    assert server.log == [] and again.fetched == [] and sorted(again.present) == sorted(first.fetched)
    image = DataLayout(tmp_path).image_folder("flickr30k") / "s2000_000005.jpg"
    image.unlink()
    third = fetch(["flickr30k"], tmp_path, server.url)
    assert third.fetched == [image]
    assert {r.name for r in server.log} == {"flickr30k-images.zip"}


def test_whole_archive_download_when_the_server_refuses_ranges(fetch, tmp_path, server, mirror):
    server.ranges = False
    fetch(["coco"], tmp_path, server.url)
    layout = DataLayout(tmp_path)
    assert load_dataset("coco", tmp_path, "test").num_images == 8
    assert len(list(layout.image_folder("coco").iterdir())) == 14
    assert all(r.status == 200 for r in server.requests("val2014.zip"))
    # the probe is cut short; the download reads the archive whole, and it is removed once unpacked
    assert server.sent("val2014.zip") >= (mirror / "val2014.zip").stat().st_size
    assert not layout.downloads.exists()


def test_a_dropped_download_resumes_from_the_byte_it_reached(fetch, tmp_path, server, mirror):
    size = (mirror / "coco_entities_release.json").stat().st_size
    server.drop("coco_entities_release.json", after=size // 3)
    fetch(["coco-entities"], tmp_path, server.url)
    assert DataLayout(tmp_path).coco_entities.read_bytes() == (mirror / "coco_entities_release.json").read_bytes()
    dropped, resumed = [r for r in server.requests("coco_entities_release.json") if r.sent > 1]
    assert dropped.dropped and dropped.sent == size // 3
    assert resumed.range == (size // 3, size) and resumed.sent == size - size // 3


def test_an_interrupted_download_resumes_from_its_part_file(fetch, tmp_path, server, mirror):
    data = (mirror / "coco_entities_release.json").read_bytes()
    dest = DataLayout(tmp_path).coco_entities
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + ".part").write_bytes(data[:1000])  # what a Ctrl-C left
    fetch(["coco-entities"], tmp_path, server.url)
    assert dest.read_bytes() == data and not dest.with_name(dest.name + ".part").exists()
    assert [r.range for r in server.requests("coco_entities_release.json")] == [(0, 1), (1000, len(data))]


def test_a_dropped_member_read_asks_only_for_the_rest(fetch, tmp_path, server):
    server.drop("flickr30k-images.zip", after=700)
    fetch(["flickr30k"], tmp_path, server.url)
    assert load_dataset("flickr30k", tmp_path, "val").num_images == 6
    log = server.requests("flickr30k-images.zip")
    dropped = next(r for r in log if r.dropped)
    assert (dropped.range[0] + 700, dropped.range[1]) in [r.range for r in log]


def test_after_ctrl_c_the_next_run_fetches_only_the_rest(fetch, tmp_path, server, monkeypatch):
    seen = []

    def interrupt_sixth(data, name):
        seen.append(name)
        if len(seen) == 6:
            raise KeyboardInterrupt
        check_image(data, name)

    monkeypatch.setattr("qpert.data.fetch.recipes.check_image", interrupt_sixth)
    with pytest.raises(KeyboardInterrupt):
        fetch(["flickr30k"], tmp_path, server.url)
    monkeypatch.setattr("qpert.data.fetch.recipes.check_image", check_image)
    layout = DataLayout(tmp_path)
    kept = {
        tmp_path / rel for rel in json.loads(layout.manifest.read_text())["datasets"]["flickr30k"] if "images" in rel
    }
    assert 0 < len(kept) < 14 and all(p.is_file() for p in kept)
    for image in layout.image_folder("flickr30k").glob("*.jpg"):  # under its final name only when complete
        check_image(image.read_bytes(), image.name)
    report = fetch(["flickr30k"], tmp_path, server.url)
    assert not kept & set(report.fetched) and len(list(layout.image_folder("flickr30k").iterdir())) == 14


def test_wrong_bytes_are_fetched_again_once_and_never_kept(fetch, tmp_path, server, mirror):
    member = "val2014/COCO_val2014_000000100002.jpg"
    server.corrupt("coco_karpathy_test.json")
    server.corrupt("val2014.zip", member_data_offset(mirror / "val2014.zip", member))
    fetch(["coco"], tmp_path, server.url)
    layout = DataLayout(tmp_path)
    assert layout.annotation_file("coco", "test").read_bytes() == (mirror / "coco_karpathy_test.json").read_bytes()
    assert len(server.requests("coco_karpathy_test.json")) == 2
    assert (layout.images_dir("coco") / member).read_bytes() == member_bytes(mirror / "val2014.zip", member)


def test_a_file_that_stays_wrong_is_an_error_and_is_not_kept(fetch, tmp_path, server):
    server.corrupt("coco_karpathy_val.json", always=True)
    with pytest.raises(FetchError, match=r"coco_karpathy_val\.json: SHA-256 .* not kept"):
        fetch(["coco"], tmp_path, server.url)
    annotations = DataLayout(tmp_path).annotations_dir("coco")
    assert sorted(p.name for p in annotations.iterdir()) == ["coco_karpathy_test.json"]  # no .part either
    assert len(server.requests("coco_karpathy_val.json")) == 2


def test_a_member_that_stays_wrong_is_an_error_and_is_not_kept(fetch, tmp_path, server, mirror):
    member = "val2014/COCO_val2014_000000100004.jpg"
    server.corrupt("val2014.zip", member_data_offset(mirror / "val2014.zip", member), always=True)
    with pytest.raises(FetchError, match=r"COCO_val2014_000000100004\.jpg.*CRC.*not kept"):
        fetch(["coco"], tmp_path, server.url)
    assert not (DataLayout(tmp_path).images_dir("coco") / member).exists()


def test_the_published_facts_refuse_a_stand_in_without_catalog(tmp_path, mirror, monkeypatch, capsys):
    run = data_cli(monkeypatch, capsys, "fetch", "coco", "--mirror", mirror, "--data-root", tmp_path, "--no-progress")
    [line] = error_lines(run)
    assert run.returncode == 2 and "coco_karpathy_test.json: MD5" in line and "--catalog" in line
    assert not DataLayout(tmp_path).annotation_file("coco", "test").exists()


def test_no_network_is_one_error_line_naming_the_url_and_the_way_around(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    run = data_cli(monkeypatch, capsys, "fetch", "flickr30k", "--mirror", url, "--data-root", tmp_path)
    [line] = error_lines(run)
    assert run.returncode == 2
    assert f"cannot reach {url}/flickr30k_test.json" in line and "--mirror FOLDER" in line
    assert str(DataLayout(tmp_path).annotation_file("flickr30k", "test")) in line


def test_flickr30k_images_from_the_hugging_face_hub(tmp_path, server, mirror, monkeypatch):
    hub_path = "/datasets/nlphuji/flickr30k/resolve/main/flickr30k-images.zip"
    server.redirects[hub_path] = "/flickr30k-images.zip"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    catalog = json.loads((mirror / "qpert-catalog.json").read_text())
    for file in ("flickr30k_test.json", "flickr30k_val.json", "annotations.zip"):
        catalog[file]["url"] = f"{server.url}/{file}"
    fetch_data(["flickr30k"], tmp_path, catalog=catalog, progress=False)
    assert load_dataset("flickr30k", tmp_path, "test").num_images == 8
    hub = server.requests(hub_path.lstrip("/"))
    assert hub and all(r.status == 302 and "hf_hub" in r.user_agent for r in hub)
    assert len(server.requests("flickr30k-images.zip")) > 1


@pytest.mark.parametrize("layout", ["kaggle-zip", "folder"])
def test_flickr30k_images_from_a_copy_the_user_has(fetch, tmp_path, server, mirror, layout):
    with zipfile.ZipFile(mirror / "flickr30k-images.zip") as z:
        members = {Path(n).name: z.read(n) for n in z.namelist()}
    if layout == "folder":
        copy = tmp_path / "images" / "flickr30k-images"
        copy.mkdir(parents=True)
        for name, data in members.items():
            (copy / name).write_bytes(data)
        copy = copy.parent
    else:
        copy = tmp_path / "flickr-image-dataset.zip"
        with zipfile.ZipFile(copy, "w") as z:
            for name, data in members.items():
                z.writestr(f"flickr30k_images/flickr30k_images/{name}", data)
    fetch(["flickr30k"], tmp_path / "data", server.url, flickr30k_images=copy)
    assert load_dataset("flickr30k", tmp_path / "data", "test").num_images == 8
    assert server.requests("flickr30k-images.zip") == []


def test_entities_under_a_top_folder(tmp_path, mirror):
    copy = tmp_path / "mirror"
    shutil.copytree(mirror, copy)
    with zipfile.ZipFile(mirror / "annotations.zip") as source, zipfile.ZipFile(copy / "annotations.zip", "w") as z:
        for name in source.namelist():
            z.writestr(f"flickr30k_entities/{name}", source.read(name))
    catalog = json.loads((copy / "qpert-catalog.json").read_text())
    catalog["annotations.zip"]["md5"] = None
    fetch_data(["flickr30k"], tmp_path / "data", mirror=str(copy), catalog=catalog, progress=False)
    layout = DataLayout(tmp_path / "data")
    ids = load_dataset("flickr30k", layout.root, "test").image_ids
    assert flickr30k_entities_boxes(layout.entities_annotations, ids).num_without_boxes == 0


def test_verify_passes_then_names_a_changed_file_and_rehash_repairs_it(fetch, tmp_path, mirror, monkeypatch, capsys):
    fetch(["flickr30k"], tmp_path, mirror)
    run = data_cli(monkeypatch, capsys, "verify", "--data-root", tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("verified 44 files") and "flickr30k" in run.stdout
    image = DataLayout(tmp_path).image_folder("flickr30k") / "s2000_000001.jpg"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 1
    image.write_bytes(bytes(data))
    run = data_cli(monkeypatch, capsys, "verify", "--data-root", tmp_path)
    [line] = error_lines(run)
    assert run.returncode == 2 and "changed flickr30k/images/flickr30k-images/s2000_000001.jpg" in line
    assert fetch(["flickr30k"], tmp_path, mirror).fetched == []  # same size: trusted without hashing
    assert fetch(["flickr30k"], tmp_path, mirror, rehash=True).fetched == [image]
    assert verify_data(tmp_path).check().checked == 44


def test_a_dry_run_lists_the_transfers_and_writes_nothing(tmp_path, server, mirror, monkeypatch, capsys):
    root = tmp_path / "data"
    run = data_cli(
        monkeypatch,
        capsys,
        *("fetch", "flickr30k", "coco-entities", "--dry-run", "--data-root", root, "--mirror", server.url),
        *("--catalog", Path(server.folder) / "qpert-catalog.json"),
    )
    assert run.returncode == 0 and not root.exists()
    assert "would fetch flickr30k-images.zip: 14 of its 44 files (ranged reads)" in run.stdout
    assert "would fetch coco_entities_release.json" in run.stdout and "nothing written" in run.stdout
    with zipfile.ZipFile(mirror / "flickr30k-images.zip") as z:
        members = {i.header_offset for i in z.infolist()}
    reads = [r.range for r in server.requests("flickr30k-images.zip")]
    assert reads and not [r for r in reads if r[0] in members and r[1] - r[0] > 1]  # a probe, the directory


def test_too_little_disk_space_stops_before_the_archives(fetch, tmp_path, mirror, monkeypatch):
    monkeypatch.setattr("qpert.data.fetch.fetcher.disk_free", lambda path: 50_000)
    with pytest.raises(FetchError, match="free"):
        fetch(["flickr30k"], tmp_path, mirror)
    assert not DataLayout(tmp_path).image_folder("flickr30k").exists()


def test_a_mirror_without_a_file_is_one_error_line_naming_it_and_where_it_goes(tmp_path, mirror, monkeypatch, capsys):
    copy = tmp_path / "mirror"
    shutil.copytree(mirror, copy, ignore=shutil.ignore_patterns("MSCOCO_FG_ann.json"))
    args = ("--mirror", copy, "--catalog", copy / "qpert-catalog.json", "--data-root", tmp_path / "data")
    run = data_cli(monkeypatch, capsys, "fetch", "fg", *args)
    [line] = error_lines(run)
    assert run.returncode == 2 and "MSCOCO_FG_ann.json" in line and str(copy) in line
    assert str(DataLayout(tmp_path / "data").fg_file("coco")) in line


def test_the_real_fg_captions_from_a_mirror(tmp_path):
    if not (REAL_FG / "Flickr30K_FG_ann.json").is_file():
        pytest.skip(f"the real FG caption files are not at {REAL_FG}")
    # the catalogue's facts for the authors' files: SHA-256, 1,000 and 5,000 images
    fetch_data(["fg"], tmp_path, mirror=str(REAL_FG), progress=False)
    for benchmark in ("flickr30k", "coco"):
        fg = DataLayout(tmp_path).fg_file(benchmark)
        assert fg.read_bytes() == (REAL_FG / fg.name).read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["fetch", "coco", "--catalog", "{tmp}/catalog.json"], "unknown source file 'val2015.zip'"),
        (["fetch", "coco", "--catalog", "{tmp}/missing.json"], "missing.json: cannot read it"),
        (["fetch", "coco", "--mirror", "{tmp}/no-such-mirror"], "no-such-mirror: no such folder"),
        (["fetch", "flickr30k", "--flickr30k-images", "{tmp}/none.zip"], "none.zip: no such zip or folder"),
        (["fetch", "flickr31k"], "unknown dataset 'flickr31k'"),
        (["verify", "coco"], "no manifest"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_user_mistakes_are_one_error_line(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "catalog.json").write_text(json.dumps({"val2015.zip": {"md5": "0"}}))
    args = [a.format(tmp=tmp_path) for a in args]
    run = data_cli(monkeypatch, capsys, *args, "--data-root", tmp_path / "data")
    [line] = error_lines(run)
    assert run.returncode == 2 and message in line
    assert not (tmp_path / "data").exists()


def test_a_full_disk_is_one_line_naming_the_file_and_a_rerun_resumes(tmp_path, server, mirror, monkeypatch, capsys):
    """Issue #23: ENOSPC mid-download says what was being written and that the same command resumes."""
    args = ("fetch", "coco-entities", "--mirror", server.url, "--data-root", tmp_path)
    with full_disk_for(monkeypatch, lambda path: path.endswith(".part")):
        run = data_cli(monkeypatch, capsys, *args, "--catalog", mirror / "qpert-catalog.json")
    [line] = error_lines(run)
    part = DataLayout(tmp_path).coco_entities.with_name("coco_entities_release.json.part")
    assert run.returncode == 2 and f"no space left on the device while writing {part}" in line, line
    assert "run the same command again" in line and "Errno" not in line
    assert "\nerror:" in "\n" + run.stderr, "the progress bars end before the error"
    assert data_cli(monkeypatch, capsys, *args, "--catalog", mirror / "qpert-catalog.json").returncode == 0
    assert DataLayout(tmp_path).coco_entities.read_bytes() == (mirror / "coco_entities_release.json").read_bytes()
