"""The server a PEFT user would write today: FastAPI + PEFT, one request per forward.

    .venv/bin/python benchmarks/peft_server.py --model DIR --adapter a0=DIR [...] --port 8081

The peer of ``lorakit serve`` in benchmarks/serve_load.py. Every adapter is loaded into one
``PeftModel`` (the first with ``from_pretrained``, the others with ``load_adapter``). Each
``POST /predict`` with TEI's body ``{"inputs": text, "adapter": name}`` takes a lock (the
active adapter is global state), calls ``set_adapter``, tokenizes and runs one forward for
that request alone. The handler is a plain ``def``, so FastAPI runs it in its thread pool;
uvicorn's settings and torch's threads are those of ``lorakit serve``.
"""

from __future__ import annotations

import argparse
import threading

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from peft import PeftModel
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

LABELS = {0: "negative", 1: "positive"}
MAX_LENGTH = 128


class PredictBody(BaseModel):
    inputs: str
    adapter: str


def create_app(model_dir: str, adapters: list[tuple[str, str]]) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(LABELS), id2label=LABELS
    )
    (first, first_dir), *rest = adapters
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: PredictBody) -> list[dict]:
        if body.adapter not in model.peft_config:
            raise HTTPException(404, f"adapter {body.adapter!r} is not loaded")
        with lock, torch.inference_mode():
            model.set_adapter(body.adapter)
            inputs = tokenizer(
                body.inputs, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
            )
            probs = model(**inputs).logits[0].softmax(-1).tolist()
        ranked = sorted(enumerate(probs), key=lambda p: -p[1])
        return [{"label": LABELS[i], "score": p} for i, p in ranked]

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the base model's directory")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    args = p.parse_args()
    adapters = [(name, path) for name, _, path in (a.partition("=") for a in args.adapter)]
    app = create_app(args.model, adapters)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
