"""Using a trained model: Predictor (encode), retrieval evaluation, merge/export, local serving."""
