"""Content hashes of parameter trees (`checkpointing.tree_fingerprint`, `tree_hash`).

The fingerprint on meshes of 8 devices and across two processes is tested in
`test_sharding.py`; here: what it detects, and that host and device agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from levi_jax import checkpointing


def _tree(seed=0):
  rs = np.random.RandomState(seed)
  return {"enc": {"kernel": rs.randn(4, 6).astype(np.float32),
                  "ids": rs.randint(0, 9, (5,)).astype(np.int32)},
          "scale": np.float32(1.5),
          "mask": np.array([True, False, True]),
          "half": rs.randn(3).astype(jnp.bfloat16)}


def test_fingerprint_of_host_and_device_trees_agree():
  tree = _tree()
  want = checkpointing.tree_fingerprint(tree)
  assert want.startswith(checkpointing.FINGERPRINT_PREFIX)
  assert checkpointing.tree_fingerprint(jax.tree.map(jnp.asarray, tree)) == want
  reordered = {"half": tree["half"], "mask": tree["mask"], "scale": tree["scale"],
               "enc": {"ids": tree["enc"]["ids"], "kernel": tree["enc"]["kernel"]}}
  assert checkpointing.tree_fingerprint(reordered) == want
  assert checkpointing.tree_fingerprint(_tree(seed=1)) != want


def test_fingerprint_sees_every_one_bit_change():
  tree = _tree()
  want = checkpointing.tree_fingerprint(tree)
  seen = {want}
  kernel = tree["enc"]["kernel"]
  for i in range(kernel.size):
    for bit in (0, 17, 31):  # lowest mantissa bit, a middle one, the sign
      changed = kernel.copy()
      changed.view(np.uint32).reshape(-1)[i] ^= np.uint32(1 << bit)
      seen.add(checkpointing.tree_fingerprint({**tree, "enc": {**tree["enc"],
                                                                "kernel": changed}}))
  assert len(seen) == 1 + 3 * kernel.size


@pytest.mark.parametrize("change", ["swap", "transpose_shape", "dtype", "rename"])
def test_fingerprint_sees_moved_values_and_metadata(change):
  tree = _tree()
  k = tree["enc"]["kernel"]
  if change == "swap":  # the same multiset of values, two of them exchanged
    k = k.copy()
    k[0, 0], k[1, 2] = k[1, 2], k[0, 0]
    other = {**tree, "enc": {**tree["enc"], "kernel": k}}
  elif change == "transpose_shape":  # the same bytes, another shape
    other = {**tree, "enc": {**tree["enc"], "kernel": k.reshape(6, 4)}}
  elif change == "dtype":  # the same bits, another dtype
    other = {**tree, "enc": {**tree["enc"], "kernel": k.view(np.int32)}}
  else:
    other = {**tree, "enc": {"kernel2": k, "ids": tree["enc"]["ids"]}}
  assert checkpointing.tree_fingerprint(other) != checkpointing.tree_fingerprint(tree)


def test_check_frozen_reads_fingerprints_and_older_sha256_hashes():
  tree = jax.tree.map(jnp.asarray, _tree())
  checkpointing.check_frozen(tree, checkpointing.tree_fingerprint(tree), "a test tree")
  checkpointing.check_frozen(tree, checkpointing.tree_hash(tree), "a test tree")  # legacy
  with pytest.raises(ValueError, match="rebuilt from a test tree .* the source changed"):
    checkpointing.check_frozen(tree, checkpointing.tree_fingerprint(_tree(seed=1)),
                               "a test tree")
