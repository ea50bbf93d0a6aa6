import numpy as np
import pytest

from sr_jax.text import HashedBagOfWords, get_featurizer


def test_hashed_bag_of_words_is_deterministic_and_sees_shared_words():
    f = HashedBagOfWords()
    texts = ["premium espresso grinder", "espresso grinder", "dog leash collar"]
    pooled, first = f.featurize(texts)
    again, _ = HashedBagOfWords().featurize(texts)
    np.testing.assert_array_equal(pooled, again)
    assert pooled.shape == first.shape == (3, f.dim) and pooled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-5)
    assert pooled[0] @ pooled[1] > 0.7 > abs(pooled[0] @ pooled[2])
    np.testing.assert_array_equal(first[1], f.featurize(["espresso"])[1][0])  # first token: its first word
    assert f.fingerprint() != HashedBagOfWords(seed=1).fingerprint()


def test_errors():
    with pytest.raises(ValueError, match="has no words"):
        HashedBagOfWords().featurize(["ok", "  !! "])
    with pytest.raises(ValueError, match="unknown text encoder"):
        get_featurizer("nope")
