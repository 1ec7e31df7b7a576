"""Scenes: procedural rooms, the scene file, ScanNet scans and generic mesh files."""

import json
import os
import shutil
import struct

import numpy as np
import open3d as o3d
import pytest
from PIL import Image

from data_pipeline.scenes import Scene, mesh, scannet, synthetic
from llm3d_jax.fileio import InputError, cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "scannet", "scene0000_00")
PLY = "scene0000_00_vh_clean_2.ply"
# Hand-computed from the fixture's raw boxes and its axisAlignment (90 degrees about z, then
# + (3, -0.5, 0.1)): raw chair [1, 1, 0]-[1.5, 1.5, 0.9] -> x' = 3 - y, y' = x - 0.5, z' = z + 0.1.
CHAIR_ALIGNED = [1.5, 0.5, 0.1, 2.0, 1.0, 1.0]
TABLE_ALIGNED = [1.7, 1.5, 0.1, 2.5, 2.7, 0.85]
CHAIR_RAW = [1.0, 1.0, 0.0, 1.5, 1.5, 0.9]


def run_cli(main, argv, capsys):
    """Runs a command line in-process as `python -m` would: -> (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ---------------------------------------------------------------- synthetic rooms
def _disjoint(a, b):
    return a[3] <= b[0] or b[3] <= a[0] or a[4] <= b[1] or b[4] <= a[1]


@pytest.mark.parametrize("seed", [0, 7])
def test_synthetic_rooms_are_valid(seed):
    for index in range(10):
        scene = synthetic.make_scene(seed, index)
        scene.validate()
        assert scene.scene_id == f"synth_{index:04d}"
        assert 3 <= len(scene.objects) <= 15
        room = np.array(scene.meta["room"])
        assert (scene.vertices >= room[:3] - 1e-6).all() and (
            scene.vertices <= room[3:] + 1e-6
        ).all()
        on = {child: parent for child, parent in scene.meta["on_top_of"]}
        boxes = {o.id: o.box for o in scene.objects}
        for obj in scene.objects:
            assert obj.label in synthetic.CATEGORIES and obj.color in synthetic.COLORS
            pts = scene.vertices[scene.instance == obj.id]
            # Exact boxes: min / max of the object's own vertices.
            np.testing.assert_array_equal(obj.box, np.concatenate([pts.min(0), pts.max(0)]))
            if obj.id in on:  # resting on its support's top, footprint inside it
                support = boxes[on[obj.id]]
                assert obj.box[2] == support[5]
                assert (obj.box[:2] >= support[:2]).all() and (obj.box[3:5] <= support[3:5]).all()
            else:
                assert obj.box[2] == 0.0
        floor = [o.box for o in scene.objects if o.id not in on]
        for i in range(len(floor)):
            for j in range(i):
                assert _disjoint(floor[i], floor[j])
        for parent in set(on.values()):
            items = [boxes[c] for c, p in on.items() if p == parent]
            assert all(_disjoint(a, b) for k, a in enumerate(items) for b in items[:k])
        assert (scene.instance[scene.vertices[:, 2] < -1e-6] == -1).all()


def test_synthetic_variety():
    scenes = [synthetic.make_scene(1, i) for i in range(30)]
    labels = {o.label for s in scenes for o in s.objects}
    colors = {o.color for s in scenes for o in s.objects}
    assert len(labels) >= 10, labels
    assert len(colors) >= 8, colors
    assert any(s.meta["on_top_of"] for s in scenes)


def test_synthetic_cli_is_byte_identical(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        status, _, _ = run_cli(
            synthetic.main, ["--num-scenes", "3", "--seed", str(seed), "--out", str(out)], capsys
        )
        assert status == 0
    names = sorted(os.listdir(a))
    assert names == ["synth_0000.npz", "synth_0001.npz", "synth_0002.npz"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    with np.load(a / names[0], allow_pickle=False) as data:
        assert data["vertices"].dtype == np.float32 and data["faces"].dtype == np.int32
        assert data["object_labels"].dtype.kind == "U"


def test_synthetic_cli_bad_arguments(tmp_path, capsys):
    status, _, err = run_cli(
        synthetic.main, ["--num-scenes", "0", "--out", str(tmp_path / "x")], capsys
    )
    assert status == 1 and err.startswith("error:") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- scene file
def test_scene_file_round_trip(tmp_path):
    scene = synthetic.make_scene(0, 2)
    path = scene.save(tmp_path)
    loaded = Scene.load(path)
    assert loaded.scene_id == scene.scene_id and loaded.meta == scene.meta
    for key in ("vertices", "faces", "colors", "instance"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(scene, key))
    assert [(o.id, o.label, o.color) for o in loaded.objects] == [
        (o.id, o.label, o.color) for o in scene.objects
    ]
    np.testing.assert_array_equal(
        np.stack([o.box for o in loaded.objects]), np.stack([o.box for o in scene.objects])
    )
    assert os.listdir(tmp_path) == [f"{scene.scene_id}.npz"]


def test_scene_file_bad_input(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="corrupt.npz"):
        Scene.load(corrupt)
    partial = tmp_path / "partial.npz"
    np.savez(partial, vertices=np.zeros((3, 3), np.float32))
    with pytest.raises(InputError, match="missing keys"):
        Scene.load(partial)
    empty = Scene("empty", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32),
                  np.zeros((0, 3), np.uint8), np.zeros(0, np.int32), [])  # fmt: skip
    empty.save(tmp_path)
    with pytest.raises(InputError, match="empty.npz: mesh has no vertices"):
        Scene.load(tmp_path / "empty.npz")


# ---------------------------------------------------------------- ScanNet
def test_scannet_fixture_boxes_are_the_hand_computed_aligned_boxes():
    scene = scannet.load_scannet_scene(FIXTURE)
    assert scene.scene_id == "scene0000_00" and scene.meta["source"] == "scannet"
    assert scene.meta["scene_type"] == "Living room / Lounge"
    assert [(o.id, o.label) for o in scene.objects] == [
        (0, "chair"),
        (1, "table"),
    ]  # floor is structure
    np.testing.assert_allclose(scene.objects[0].box, CHAIR_ALIGNED, atol=1e-6)
    np.testing.assert_allclose(scene.objects[1].box, TABLE_ALIGNED, atol=1e-6)
    # Raw floor corner (0, 0, 0) -> (3, -0.5, 0.1); floor and the unlabelled box are instance -1.
    np.testing.assert_allclose(scene.vertices[0], [3.0, -0.5, 0.1], atol=1e-6)
    assert (scene.instance[:4] == -1).all() and (scene.instance[-8:] == -1).all()
    np.testing.assert_array_equal(scene.colors[4], [200, 40, 40])
    assert scene.faces.shape == (2 + 4 * 12, 3)


def _copy_fixture(tmp_path):
    scan = tmp_path / "scene0000_00"
    shutil.copytree(FIXTURE, scan, ignore=shutil.ignore_patterns("frames"))
    return scan


def test_scannet_without_axis_alignment_warns_and_uses_identity(tmp_path):
    scan = _copy_fixture(tmp_path)
    (scan / "scene0000_00.txt").write_text("sceneType = Bedroom\n")
    with pytest.warns(UserWarning, match="no axisAlignment"):
        scene = scannet.load_scannet_scene(str(scan))
    np.testing.assert_allclose(scene.objects[0].box, CHAIR_RAW, atol=1e-6)
    assert scene.meta["axis_aligned"] is False


def test_scannet_test_split_scan_without_annotations(tmp_path):
    scan = _copy_fixture(tmp_path)
    for name in (
        "scene0000_00.aggregation.json",
        "scene0000_00_vh_clean_2.0.010000.segs.json",
        "scene0000_00.txt",
    ):
        (scan / name).unlink()
    with pytest.warns(UserWarning) as caught:
        scene = scannet.load_scannet_scene(str(scan))
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        f"{scan / 'scene0000_00.aggregation.json'}: file not found: the scene has no objects",
        f"{scan / 'scene0000_00.txt'}: no axisAlignment: using identity",
    ]
    assert scene.objects == [] and (scene.instance == -1).all() and len(scene.faces) == 50


def test_scannet_bad_inputs(tmp_path):
    scan = _copy_fixture(tmp_path)
    agg_path = scan / "scene0000_00.aggregation.json"
    agg = json.loads(agg_path.read_text())
    agg["segGroups"][1]["segments"] = [42, 999]
    agg_path.write_text(json.dumps(agg))
    with pytest.raises(
        InputError, match=r"aggregation.json: object 1 \(table\) uses segments \[999\]"
    ):
        scannet.load_scannet_scene(str(scan))

    scan = _copy_fixture(tmp_path / "2")
    segs_path = scan / "scene0000_00_vh_clean_2.0.010000.segs.json"
    segs = json.loads(segs_path.read_text())
    segs["segIndices"] = segs["segIndices"][:-3]
    segs_path.write_text(json.dumps(segs))
    with pytest.raises(
        InputError, match="segs.json: segIndices has 33 entries, the mesh has 36 vertices"
    ):
        scannet.load_scannet_scene(str(scan))

    scan = _copy_fixture(tmp_path / "3")
    ply = scan / PLY
    data = ply.read_bytes()
    ply.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="_vh_clean_2.ply: truncated"):
        scannet.load_scannet_scene(str(scan))
    ply.unlink()
    with pytest.raises(InputError, match="_vh_clean_2.ply: file not found"):
        scannet.load_scannet_scene(str(scan))
    ply.write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputError, match="not a PLY file"):
        scannet.load_scannet_scene(str(scan))


def test_scannet_cli_isolates_a_bad_scan(tmp_path, capsys):
    scans = tmp_path / "scans"
    good = _copy_fixture(scans)
    bad = scans / "scene0001_00"
    shutil.copytree(good, bad)
    for f in os.listdir(bad):
        os.rename(bad / f, bad / f.replace("scene0000_00", "scene0001_00"))
    header = b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nproperty float x\nproperty float y\n"
    header += (
        b"property float z\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n"
    )
    (bad / "scene0001_00_vh_clean_2.ply").write_bytes(header)
    out = tmp_path / "out"
    status, _, err = run_cli(scannet.main, ["--scans", str(scans), "--out", str(out)], capsys)
    assert status == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "scene0001_00_vh_clean_2.ply: empty or unreadable mesh" in errors[0]
    assert sorted(os.listdir(out)) == ["scene0000_00.npz"]


# ---------------------------------------------------------------- generic meshes
def _tetra():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]], np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    return vertices, faces, colors


def write_glb(path, vertices, faces, colors):
    """A minimal glTF 2.0 binary: one primitive with POSITION, COLOR_0 and indices."""
    v, c = np.asarray(vertices, np.float32), np.asarray(colors, np.float32) / 255
    blobs = [v.tobytes(), c.tobytes(), np.asarray(faces, np.uint32).tobytes()]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    gltf = {
        "asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "indices": 2}]}],
        "buffers": [{"byteLength": offsets[-1]}],
        "bufferViews": [{"buffer": 0, "byteOffset": offsets[k], "byteLength": len(b)} for k, b in enumerate(blobs)],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": len(v), "type": "VEC3",
             "min": v.min(0).tolist(), "max": v.max(0).tolist()},
            {"bufferView": 1, "componentType": 5126, "count": len(v), "type": "VEC3"},
            {"bufferView": 2, "componentType": 5125, "count": int(np.size(faces)), "type": "SCALAR"},
        ],
    }  # fmt: skip
    js = json.dumps(gltf).encode()
    js += b" " * (-len(js) % 4)
    binary = b"".join(blobs)
    binary += b"\0" * (-len(binary) % 4)
    with open(path, "wb") as f:
        f.write(struct.pack("<4sII", b"glTF", 2, 28 + len(js) + len(binary)))
        f.write(
            struct.pack("<I4s", len(js), b"JSON")
            + js
            + struct.pack("<I4s", len(binary), b"BIN\0")
            + binary
        )


def _o3d_mesh(vertices, faces, colors):
    m = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(vertices.astype(float)), o3d.utility.Vector3iVector(faces)
    )
    m.vertex_colors = o3d.utility.Vector3dVector(colors / 255.0)
    return m


def test_mesh_files_read_as_scenes(tmp_path):
    vertices, faces, colors = _tetra()
    m = _o3d_mesh(vertices, faces, colors)
    o3d.io.write_triangle_mesh(str(tmp_path / "binary.ply"), m)
    o3d.io.write_triangle_mesh(str(tmp_path / "ascii.ply"), m, write_ascii=True)
    o3d.io.write_triangle_mesh(str(tmp_path / "tetra.obj"), m)
    write_glb(tmp_path / "tetra.glb", vertices, faces, colors)
    for name in ("binary.ply", "ascii.ply", "tetra.obj", "tetra.glb"):
        scene = mesh.load_mesh_scene(str(tmp_path / name))
        assert scene.meta["source"] == "mesh" and len(scene.objects) == 1
        assert scene.objects[0].label == os.path.splitext(name)[0]
        assert (scene.instance == 0).all() and len(scene.faces) == 4
        expected = (
            vertices if name != "tetra.glb" else vertices[:, [0, 2, 1]] * [1, -1, 1]
        )  # glTF y-up -> z-up
        order = np.lexsort(scene.vertices.T)
        np.testing.assert_allclose(
            scene.vertices[order], expected[np.lexsort(expected.T)], atol=1e-6
        )
        np.testing.assert_array_equal(scene.colors[order], colors[np.lexsort(expected.T)])
        np.testing.assert_allclose(
            scene.objects[0].box, [*expected.min(0), *expected.max(0)], atol=1e-6
        )


def test_ply_big_endian_doubles_and_float_colours(tmp_path):
    vertices, faces, colors = _tetra()
    header = (
        "ply\nformat binary_big_endian 1.0\nelement vertex 4\nproperty double x\nproperty double y\n"
        "property double z\nproperty float red\nproperty float green\nproperty float blue\n"
        "element face 4\nproperty list uchar uint vertex_indices\nend_header\n"
    )
    body = b"".join(struct.pack(">dddfff", *p, *(c / 255)) for p, c in zip(vertices, colors))
    body += b"".join(struct.pack(">BIII", 3, *f) for f in faces)
    (tmp_path / "be.ply").write_bytes(header.encode() + body)
    got_v, got_f, got_c = mesh.read_ply(str(tmp_path / "be.ply"))
    np.testing.assert_array_equal(got_v, vertices)
    np.testing.assert_array_equal(got_f, faces)
    np.testing.assert_array_equal(got_c, colors)


def test_ply_polygons_are_fan_triangulated(tmp_path):
    path = tmp_path / "quad.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n"
    )
    vertices, faces, colors = mesh.read_mesh(str(path))
    np.testing.assert_array_equal(faces, [[0, 1, 2], [0, 2, 3]])
    assert (colors == mesh.DEFAULT_GRAY).all()


def test_textured_obj_gets_vertex_colours_from_its_texture(tmp_path):
    texture = np.zeros((4, 4, 3), np.uint8)
    texture[:, :2] = [255, 0, 0]  # left half red, right half blue
    texture[:, 2:] = [0, 0, 255]
    Image.fromarray(texture).save(tmp_path / "tex.png")
    (tmp_path / "t.mtl").write_text("newmtl m\nKd 1 1 1\nmap_Kd tex.png\n")
    (tmp_path / "t.obj").write_text(
        "mtllib t.mtl\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\n"
        "vt 0.1 0.5\nvt 0.9 0.5\nvt 0.9 0.5\nvt 0.1 0.5\nusemtl m\nf 1/1 2/2 3/3\nf 1/1 3/3 4/4\n"
    )
    scene = mesh.load_mesh_scene(str(tmp_path / "t.obj"))
    np.testing.assert_array_equal(
        scene.colors, [[255, 0, 0], [0, 0, 255], [0, 0, 255], [255, 0, 0]]
    )


def test_mesh_objects_json(tmp_path):
    vertices, faces, colors = _tetra()
    o3d.io.write_triangle_mesh(str(tmp_path / "t.ply"), _o3d_mesh(vertices, faces, colors))
    objects = {"objects": [{"id": 5, "label": "base", "box": [-1, -1, -1, 2, 3, 0.5], "color": "red"},
                           {"id": 9, "label": "tip", "vertex_indices": [3]}]}  # fmt: skip
    (tmp_path / "o.json").write_text(json.dumps(objects))
    scene = mesh.load_mesh_scene(str(tmp_path / "t.ply"), str(tmp_path / "o.json"))
    assert [(o.id, o.label, o.color) for o in scene.objects] == [(5, "base", "red"), (9, "tip", "")]
    np.testing.assert_array_equal(scene.instance, [5, 5, 5, 9])
    np.testing.assert_allclose(scene.objects[0].box, [0, 0, 0, 1, 2, 0])
    objects["objects"][1]["vertex_indices"] = [2, 3]
    (tmp_path / "o.json").write_text(json.dumps(objects))
    with pytest.raises(InputError, match=r"o.json: object 1 \(tip\): shares vertices"):
        mesh.load_mesh_scene(str(tmp_path / "t.ply"), str(tmp_path / "o.json"))
    (tmp_path / "o.json").write_text("{not json")
    with pytest.raises(InputError, match="o.json: expected JSON"):
        mesh.load_mesh_scene(str(tmp_path / "t.ply"), str(tmp_path / "o.json"))


def test_mesh_bad_inputs(tmp_path, capsys):
    (tmp_path / "garbage.obj").write_text("this is not an obj file\n")
    (tmp_path / "empty.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 0\nproperty list uchar int vertex_indices\nend_header\n"
    )
    (tmp_path / "model.stl").write_text("solid x\nendsolid x\n")
    cases = {
        "missing.ply": "file not found",
        "garbage.obj": "empty or unreadable mesh",
        "empty.ply": "empty or unreadable mesh (0 vertices, 0 triangles)",
        "model.stl": "unsupported mesh type",
    }
    for name, problem in cases.items():
        with pytest.raises(InputError) as info:
            mesh.load_mesh_scene(str(tmp_path / name))
        assert str(info.value) == f"{tmp_path / name}: {problem}" or str(info.value).startswith(
            f"{tmp_path / name}: {problem}"
        )
    out = tmp_path / "out"
    status, _, err = run_cli(mesh.main, [str(tmp_path / "empty.ply"), "--out", str(out)], capsys)
    assert (
        status == 1
        and err.count("\n") == 1
        and err.startswith(f"error: {tmp_path / 'empty.ply'}: ")
    )
    assert not out.exists() or os.listdir(out) == []
