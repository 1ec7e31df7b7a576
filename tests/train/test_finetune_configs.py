"""The fine-tuning configs hold the released 3D-LLM's settings (its LAVIS yaml files)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module(name):
    path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_3dmv_vqa_config_is_the_release_yaml():
    module = _module("3dmv_vqa_flant5xl")
    c = module.get_config()
    # finetune_3dmvvqa.yaml: init_lr 1e-4, min_lr 1e-5, warmup_steps 1000, weight_decay 0.05,
    # batch_size_train 2 x world_size 16, max_len 40, max_epoch 100
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_steps) == (1e-4, 1e-5, 1000)
    assert c.optim.weight_decay == 0.05 and (c.optim.b1, c.optim.b2) == (0.9, 0.999)
    assert c.batch_size == 32 and c.data.answer_len == 40
    assert c.data.datasets == "3dmv_vqa" and c.data.num_points == 5000
    assert module.release_total_steps(3200) == 10_000  # 100 epochs of 100 batches
    assert module.release_total_steps(33) == 104
