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


def test_any_unicode_text_has_a_vector():
    """Words of any script are words; a text with none gets the empty text's vector (it raised before)."""
    f = HashedBagOfWords()
    pooled, first = f.featurize(["東京 タワー", "東京", "Café crème", "cafe creme", "!!! ???", "...", "CAFÉ"])
    assert np.all(np.isfinite(pooled)) and pooled[0] @ pooled[1] > 0.7  # they share the word 東京
    assert pooled[2] @ pooled[6] > 0.7 and abs(pooled[2] @ pooled[3]) < 0.5  # é is a letter; case folds
    np.testing.assert_array_equal(pooled[4], pooled[5])  # no word at all: the empty text, whatever its marks
    np.testing.assert_array_equal(first[4], f.featurize([""])[1][0])


def test_errors():
    with pytest.raises(ValueError, match="unknown text encoder"):
        get_featurizer("nope")
