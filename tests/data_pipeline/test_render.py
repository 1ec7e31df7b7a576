"""Rendering: pixel convention, back-projection onto the mesh, instance / colour / normal
correctness, camera sampling, bad cameras, the views file, ScanNet RGB-D frames, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import open3d as o3d
import pytest
from PIL import Image

from data_pipeline import render
from data_pipeline.scenes import Scene, SceneObject, scannet, synthetic
from llm3d_jax.fileio import InputError, cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "scannet", "scene0000_00")


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: render.main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _o3d_scene(scene):
    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(
        o3d.core.Tensor(scene.vertices), o3d.core.Tensor(scene.faces.astype(np.uint32))
    )
    return rc


@pytest.fixture(scope="module")
def room():
    scene = synthetic.make_scene(0, 3)
    return scene, render.render_scene(scene, num_views=4, width=64, height=48, seed=0)


def _plane_scene(z=2.0, colors=((255, 0, 0), (0, 255, 0), (0, 0, 255))):
    """One big triangle in the plane z = `z`, facing -z (towards a camera at the origin)."""
    vertices = np.array([[-10, -10, z], [10, -10, z], [0, 20, z]], np.float32)
    return Scene("plane", vertices, np.array([[0, 2, 1]], np.int32), np.array(colors, np.uint8),
                 np.zeros(3, np.int32), [SceneObject(0, "plane", np.zeros(6, np.float32))])  # fmt: skip


def test_pixel_centre_convention():
    """Pixel (v, u) is the ray through (u + 0.5, v + 0.5); depth is z along the camera axis."""
    scene = _plane_scene(z=2.0)
    K = np.array([[4.0, 0, 3.0], [0, 4.0, 2.0], [0, 0, 1]], np.float32)  # 6x4 image, centre (3, 2)
    views = render.render_views(scene, np.eye(4), K, width=6, height=4)
    np.testing.assert_allclose(views.depth[0], 2.0, atol=1e-5)
    points = render.backproject(views.depth[0], K, np.eye(4))
    u, v = np.meshgrid(np.arange(6), np.arange(4))
    np.testing.assert_allclose(points[..., 0], (u + 0.5 - 3.0) / 4.0 * 2.0, atol=1e-5)
    np.testing.assert_allclose(points[..., 1], (v + 0.5 - 2.0) / 4.0 * 2.0, atol=1e-5)
    # The image is symmetric about its centre: columns u and W-1-u mirror each other.
    np.testing.assert_allclose(points[:, :, 0], -points[:, ::-1, 0], atol=1e-5)
    # Batched back-projection equals the per-view one.
    both = render.backproject(
        np.stack([views.depth[0]] * 2), np.stack([K] * 2), np.stack([np.eye(4)] * 2)
    )
    np.testing.assert_allclose(both[1], points)


def test_look_at_is_an_opencv_camera():
    pose = render.look_at(eye=(0, 0, 1), target=(5, 0, 1))
    np.testing.assert_allclose(pose[:3, 2], [1, 0, 0], atol=1e-6)  # z forward
    np.testing.assert_allclose(pose[:3, 1], [0, 0, -1], atol=1e-6)  # y down
    np.testing.assert_allclose(pose[:3, 0], [0, -1, 0], atol=1e-6)  # x right
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-6)


def test_backprojected_depth_lands_on_the_mesh(room):
    scene, views = room
    valid = views.depth > 0
    assert valid.mean() > 0.5
    points = render.backproject(views.depth, views.K, views.cam_to_world)[valid]
    distance = _o3d_scene(scene).compute_distance(o3d.core.Tensor(points)).numpy()
    assert distance.max() < 1e-3, distance.max()


def test_instance_ids_are_the_objects_of_the_hit_triangles(room):
    scene, views = room
    valid = views.depth > 0
    points = render.backproject(views.depth, views.K, views.cam_to_world)[valid]
    closest = _o3d_scene(scene).compute_closest_points(o3d.core.Tensor(points))
    corners = scene.instance[scene.faces[closest["primitive_ids"].numpy()]]  # [N,3]
    assert (corners == corners[:, :1]).all()  # synthetic triangles never straddle objects
    rendered = views.instance[valid]
    # Where two surfaces touch (a lamp standing on a table), the closest triangle can be either.
    assert (rendered == corners[:, 0]).mean() > 0.99
    assert len(set(rendered.tolist()) - {-1}) >= 2
    boxes = {o.id: o.box for o in scene.objects}
    for k in set(rendered.tolist()) - {-1}:
        p = points[rendered == k]
        assert ((p >= boxes[k][:3] - 1e-3) & (p <= boxes[k][3:] + 1e-3)).all()
    assert (views.instance[~valid] == -1).all()


def test_rgb_interpolates_vertex_colours_barycentrically():
    scene = _plane_scene(z=3.0)
    K = render.pinhole_K(16, 12, 60.0)
    views = render.render_views(scene, np.eye(4), K, 16, 12)
    points = render.backproject(views.depth[0], K, np.eye(4)).reshape(-1, 3).astype(np.float64)
    tri = scene.vertices[scene.faces[0]].astype(np.float64)  # corners in face order
    # Barycentric weights from the 2D (x, y) position inside the triangle.
    a = np.stack([tri[1, :2] - tri[0, :2], tri[2, :2] - tri[0, :2]], axis=1)
    wu, wv = np.linalg.solve(a, (points[:, :2] - tri[0, :2]).T)
    weights = np.stack([1 - wu - wv, wu, wv], axis=1)
    expected = weights @ scene.colors[scene.faces[0]].astype(np.float64)
    assert (views.depth > 0).all()
    assert np.abs(views.rgb[0].reshape(-1, 3) - expected).max() <= 1.0


def test_normals_face_the_camera_and_are_unit(room):
    scene, views = room
    valid = views.depth > 0
    n = views.normals[valid]
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    assert (views.normals[~valid] == 0).all()
    points = render.backproject(views.depth, views.K, views.cam_to_world)
    eye = views.cam_to_world[:, None, None, :3, 3]
    assert (np.einsum("vhwi,vhwi->vhw", views.normals, points - eye)[valid] < 0).all()
    floor = valid & (np.abs(points[..., 2]) < 1e-4) & (views.instance == -1)
    assert floor.any()
    np.testing.assert_allclose(
        views.normals[floor], np.broadcast_to([0, 0, 1], views.normals[floor].shape), atol=1e-5
    )


def test_room_cameras_stand_at_eye_height_outside_objects_and_see_objects():
    scene = synthetic.make_scene(2, 5)
    views = render.render_scene(scene, num_views=8, width=48, height=36, seed=1)
    eyes = views.cam_to_world[:, :3, 3]
    assert ((eyes[:, 2] >= 1.2) & (eyes[:, 2] <= 1.7)).all()
    for obj in scene.objects:
        inside = np.all((eyes >= obj.box[:3]) & (eyes <= obj.box[3:]), axis=1)
        assert not inside.any()
    raycaster = render.Raycaster(scene)
    assert all(raycaster.camera_problem(e) is None for e in eyes)
    seen = set(np.unique(views.instance).tolist()) - {-1}
    assert len(seen) >= 0.6 * len(scene.objects), (seen, len(scene.objects))
    centre = views.instance[:, 17:19, 23:25].max(axis=(1, 2))
    assert (centre >= 0).all()  # each view looks at an object
    # Same seed, same cameras; another seed, other cameras.
    again = render.render_scene(scene, num_views=8, width=48, height=36, seed=1)
    np.testing.assert_array_equal(again.cam_to_world, views.cam_to_world)
    other = render.render_scene(scene, num_views=8, width=48, height=36, seed=2)
    assert not np.allclose(other.cam_to_world, views.cam_to_world)


def test_orbit_around_a_single_object():
    scene = synthetic.make_scene(0, 4)
    obj = scene.objects[0]
    keep = scene.instance[scene.faces[:, 0]] == obj.id
    used = np.unique(scene.faces[keep])
    remap = np.full(len(scene.vertices), -1)
    remap[used] = np.arange(len(used))
    single = Scene("single", scene.vertices[used], remap[scene.faces[keep]].astype(np.int32), scene.colors[used],
                   scene.instance[used], [obj], {"source": "mesh"})  # fmt: skip
    views = render.render_scene(single, num_views=6, width=40, height=30, seed=0)
    centre = (obj.box[:3] + obj.box[3:]) / 2
    distances = np.linalg.norm(views.cam_to_world[:, :3, 3] - centre, axis=1)
    np.testing.assert_allclose(distances, distances[0], rtol=1e-5)
    assert ((views.instance == obj.id).reshape(6, -1).mean(axis=1) > 0.05).all()
    # The whole object stays in view: no object pixel on the image border.
    border = np.concatenate(
        [
            views.instance[:, 0],
            views.instance[:, -1],
            views.instance[:, :, 0],
            views.instance[:, :, -1],
        ],
        axis=1,
    )
    assert (border == -1).all()
    # Orbit around one object inside a room: every view sees it.
    room_views = render.render_scene(
        scene, num_views=4, width=40, height=30, mode="orbit", object_id=obj.id
    )
    assert ((room_views.instance == obj.id).reshape(4, -1).mean(axis=1) > 0.02).all()


def test_camera_inside_geometry_is_an_error():
    scene = synthetic.make_scene(0, 3)
    K = render.pinhole_K(16, 12, 80)
    biggest = max(scene.objects, key=lambda o: np.prod(o.box[3:] - o.box[:3]))
    inside = render.look_at(
        (biggest.box[:3] + biggest.box[3:]) / 2,
        np.array(scene.meta["room"][3:]) / 2 + [0.1, 0.1, 0],
    )
    with pytest.raises(
        InputError, match=r"synth_0003: view 0: camera at .* (inside|from the mesh)"
    ):
        render.render_views(scene, inside[None], K, 16, 12)
    # Inside a closed object but clear of its surface: the back-face test catches it.
    box = Scene(
        "cube",
        *synthetic.box((0, 0, 0), (2, 2, 2)),
        np.zeros((8, 3), np.uint8),
        np.zeros(8, np.int32),
        [],
    )
    with pytest.raises(
        InputError, match=r"cube: view 0: camera at \(1.000, 1.000, 1.000\) is inside geometry"
    ):
        render.render_views(box, render.look_at((1, 1, 1), (2, 1.5, 1))[None], K, 16, 12)
    # An open mesh (the bottom face, normal -z) seen from behind, from outside its bounds, is fine.
    open_mesh = Scene("sheet", box.vertices, box.faces[:2], box.colors, box.instance, [])
    views = render.render_views(open_mesh, render.look_at((1, 0.5, 3), (1, 1, 0))[None], K, 16, 12)
    assert (views.depth > 0).any()
    touching = render.look_at((0.005, 1.0, 1.5), (2.0, 1.0, 1.0))
    with pytest.raises(InputError, match="0.005 m from the mesh"):
        render.render_views(scene, touching[None], K, 16, 12)


def test_views_file_and_contact_sheet(room, tmp_path):
    _, views = room
    path = views.save(tmp_path)
    loaded = render.Views.load(path)
    for key in ("rgb", "depth", "instance", "normals", "K", "cam_to_world"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(views, key))
        assert getattr(loaded, key).dtype == getattr(views, key).dtype
    assert loaded.scene_id == views.scene_id
    render.save_contact_sheet(views, tmp_path / "sheet.png")
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size == (70 + 4 * 64, 18 + 3 * 48)
        sheet = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(sheet[18 : 18 + 48, 70 : 70 + 64], views.rgb[0])
    np.savez(tmp_path / "bad.npz", rgb=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(InputError, match="bad.npz: missing keys"):
        render.Views.load(tmp_path / "bad.npz")


def test_scannet_rgbd_frames_read_as_views():
    align = scannet.read_axis_alignment(os.path.join(FIXTURE, "scene0000_00.txt"))
    with pytest.warns(UserWarning, match="2.txt: non-finite pose"):
        views = render.read_scannet_frames(
            os.path.join(FIXTURE, "frames"), "scene0000_00", axis_alignment=align
        )
    assert views.rgb.shape == (2, 60, 80, 3) and views.depth.shape == (2, 60, 80)
    assert (views.instance == -1).all()
    np.testing.assert_allclose(views.K[0, :2, 2], [40.0, 30.0])  # ScanNet cx 39.5 -> our 40
    scene = scannet.load_scannet_scene(FIXTURE)
    valid = views.depth > 0
    points = render.backproject(views.depth, views.K, views.cam_to_world)[valid]
    distance = _o3d_scene(scene).compute_distance(o3d.core.Tensor(points)).numpy()
    assert distance.max() < 2e-3  # depth is stored in whole millimetres
    n = views.normals[valid]
    assert (np.linalg.norm(n, axis=-1) > 0.99).mean() > 0.8
    # The chair is red in the jpg too (resized from 160x120).
    rendered = render.render_views(scene, views.cam_to_world, views.K, 80, 60)
    chair = rendered.instance == 0
    assert chair.any()
    assert np.abs(views.rgb[chair].astype(int) - [200, 40, 40]).mean() < 40


def test_render_cli_rgbd_frames(tmp_path, capsys):
    frames, txt = os.path.join(FIXTURE, "frames"), os.path.join(FIXTURE, "scene0000_00.txt")
    argv = ["--rgbd", frames, "--scene-id", "scene0000_00", "--align", txt, "--out", str(tmp_path)]
    status, out, err = run_cli(argv, capsys)
    assert status == 0 and "wrote 2 frames" in out
    assert (
        err == f"warning: {os.path.join(frames, 'pose', '2.txt')}: non-finite pose, frame skipped\n"
    )
    views = render.Views.load(tmp_path / "scene0000_00.npz")
    with pytest.warns(UserWarning, match="non-finite pose"):
        expected = render.read_scannet_frames(
            frames, axis_alignment=scannet.read_axis_alignment(txt)
        )
    np.testing.assert_array_equal(views.cam_to_world, expected.cam_to_world)
    assert (tmp_path / "scene0000_00.png").exists()


def test_scannet_frames_bad_input(tmp_path):
    with pytest.raises(InputError, match="no depth/"):
        render.read_scannet_frames(str(tmp_path))
    (tmp_path / "depth").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "depth" / "0.png")
    with pytest.raises(InputError, match="intrinsic_depth.txt: file not found"):
        render.read_scannet_frames(str(tmp_path))


def test_render_cli_renders_good_scenes_and_reports_bad_ones(tmp_path, capsys):
    scenes, out = tmp_path / "scenes", tmp_path / "views"
    for index in (0, 1):
        synthetic.make_scene(5, index).save(scenes)
    (scenes / "broken.npz").write_bytes(b"not a zip file")
    status, _, err = run_cli(
        [
            "--scenes",
            str(scenes),
            "--out",
            str(out),
            "--views",
            "2",
            "--width",
            "32",
            "--height",
            "24",
        ],
        capsys,
    )
    assert status == 1
    assert err.splitlines() == [
        f"error: {scenes / 'broken.npz'}: " + err.split(": ", 2)[2].rstrip("\n")
    ]
    assert sorted(os.listdir(out)) == [
        "synth_0000.npz",
        "synth_0000.png",
        "synth_0001.npz",
        "synth_0001.png",
    ]
    views = render.Views.load(out / "synth_0001.npz")
    assert views.rgb.shape == (2, 24, 32, 3)


def test_render_cli_camera_inside_geometry(tmp_path, capsys):
    scene = synthetic.make_scene(5, 0)
    scene.save(tmp_path / "scenes")
    box = scene.objects[0].box
    cameras = tmp_path / "cams.json"
    cameras.write_text(json.dumps([{"eye": [1.0, 1.0, 1.5], "target": [2.0, 2.0, 1.0]},
                                   {"eye": ((box[:3] + box[3:]) / 2).tolist(), "target": [0.1, 0.1, 0.1]}]))  # fmt: skip
    out = tmp_path / "views"
    status, _, err = run_cli(
        ["--scenes", str(tmp_path / "scenes"), "--out", str(out), "--cameras", str(cameras)], capsys
    )
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {cameras} (scene ") and "view 1: camera at" in err
    assert not out.exists() or os.listdir(out) == []  # nothing partial
    cameras.write_text("[]")
    status, _, err = run_cli(
        ["--scenes", str(tmp_path / "scenes"), "--out", str(out), "--cameras", str(cameras)], capsys
    )
    assert status == 1 and err.startswith(f"error: {cameras}: expected a non-empty list")


def test_render_command_line_exit_status(tmp_path):
    """The real `python -m` entry: one line on stderr and status 1."""
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.render", "--scenes", str(tmp_path / "nothing"), "--out", str(tmp_path / "v")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'nothing'}: not found\n"
    assert not (tmp_path / "v").exists()
