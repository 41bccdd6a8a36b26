"""Scene keys, which chats use to re-build the scene of an item (the training chats are tested in
test_chats.py, the eval's follow-up prompts in test_eval.py)."""
from __future__ import annotations

import pytest

from r4b_edge.errors import TrainingError
from r4b_edge.train import world as W


def test_scene_key_round_trip_and_bad_keys():
    for i in range(20):
        scene, _ = W.make_example(3, i, "sum")
        assert W.Scene.from_key(scene.key()) == scene
    with pytest.raises(TrainingError, match="4 cells"):
        W.Scene.from_key("digit:1:red|digit:2:red")
