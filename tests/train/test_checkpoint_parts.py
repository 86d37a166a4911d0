"""Checkpointer helpers behind adapter-only checkpoints: `prune` keeps exactly the masked leaves
(empty subtrees dropped), `graft` puts them back into a base tree, and `state_parts` splits a
state dataclass into params and the other (non-None) fields."""

import flax.struct
import numpy as np

from lm_jax.tree_parts import graft, prune, state_parts

TREE = {"a": {"kernel": np.ones(2), "lora_a": np.zeros(1)}, "b": {"kernel": np.ones(3)}}
MASK = {"a": {"kernel": False, "lora_a": True}, "b": {"kernel": False}}


def test_prune_keeps_masked_leaves_and_graft_restores_the_tree():
    part = prune(TREE, MASK)
    assert list(part) == ["a"] and list(part["a"]) == ["lora_a"]  # "b" is empty: dropped
    assert prune(TREE, None) is TREE
    new = graft(TREE, {"a": {"lora_a": np.full(1, 7.0)}})
    assert new["a"]["lora_a"][0] == 7.0 and new["a"]["kernel"] is TREE["a"]["kernel"]
    assert new["b"] is TREE["b"] and TREE["a"]["lora_a"][0] == 0.0  # the base is not mutated


@flax.struct.dataclass
class State:
    step: int
    params: dict
    proposal: dict | None


def test_state_parts_leaves_out_none_fields():
    params, rest = state_parts(State(step=3, params=TREE, proposal=None))
    assert params is TREE and rest == {"step": 3}
