"""The MLflow model that training logs with each run (``model/``): a pyfunc defined by this code file
("models from code", MLflow 2.12+), so nothing is pickled. Its one artifact is the run's ``best.pt``, read
with ``weights_only`` like every imem checkpoint (imem.checkpoints); its config holds the feature store's
image size, so file inputs are resized as in training.

Input: a list of image or audio file paths (on the machine that runs the model); the signature comes from
``predict``'s type hints. Output: the rows of ``imem predict``'s table as dicts: one per image; per audio file
one per 2-s window and a ``mean`` row (keys file, type, window, start_s, end_s, valence, arousal, ...).

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    model.predict(["photo.jpg", "song.wav"])

``mlflow models serve -m runs:/<run id>/model --env-manager local`` (in the imem environment: imem is not on PyPI) serves the same (request ``{"inputs": ["/data/photo.jpg"]}``). Loading a pyfunc runs this file, as every MLflow pyfunc runs its code:
load models only from a tracking store you trust; ``imem predict --model runs:/...`` reads the checkpoint
alone.
"""

import mlflow


class ImemVA(mlflow.pyfunc.PythonModel):
    """Valence-arousal of image and audio files with an imem checkpoint."""

    def load_context(self, context) -> None:
        from imem.inference import Predictor, load_model

        config = context.model_config or {}
        loaded = load_model(context.artifacts["checkpoint"])
        self.predictor = Predictor(loaded, image_size=int(config.get("image_size", 224)), progress=False)

    def predict(self, context, model_input: list[str], params=None):  # output: row dicts (no hint: mixed types)
        """``model_input``: paths of image or audio files; one dict per row of imem predict's table."""
        from imem.inference import predict

        df = predict([str(p) for p in model_input], self.predictor)
        return df.astype(object).where(df.notna(), None).to_dict(orient="records")


mlflow.models.set_model(ImemVA())
