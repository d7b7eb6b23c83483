"""The Predictor truncates where sentence-transformers does, so long texts embed the same."""

import numpy as np
from sentence_transformers import SentenceTransformer

from vembed.inference.predictor import Predictor


def test_long_texts_match_sentence_transformers(minilm_path):
    long = " ".join(f"word{i} is documented in section {i}." for i in range(120))  # > 256 tokens
    texts = [long, long[:700], "short query"]
    st = SentenceTransformer(minilm_path, device="cpu")
    predictor = Predictor(minilm_path, device="cpu")
    assert predictor.spec.max_seq_length == st.max_seq_length == 256
    ours = predictor.encode_text(texts, batch_size=2)
    theirs = st.encode(texts, batch_size=2)
    assert np.abs(ours - theirs).max() <= 1e-5
