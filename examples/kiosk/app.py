"""A kiosk page: drop a photo, see the most similar gallery photos, switch parts off, see why.

    cmn-edge index build examples/photos --index /tmp/kiosk-index
    python examples/kiosk/app.py --index /tmp/kiosk-index      # then open http://127.0.0.1:5000

The page offers the model's parts that drive the current results as chips: a CMN's concepts
(one dimension each) or a DGML model's groups (a block of dimensions each; see
``cmn_edge.parts``). Switching one off searches again with that part left out of the score
(the index's ``exclude``). "Why?" on a result draws where the top parts were found in both
photos (``cmn_edge.explain`` + ``cmn_edge.render``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, render_template, request, send_file
from PIL import Image
from werkzeug.utils import secure_filename

from cmn_edge import Embedder, ImageError
from cmn_edge.explain import ConceptTerm, Explanation, explain, share_of
from cmn_edge.index import ConceptIndexError, Index, embedder_for_index
from cmn_edge.preprocess import open_image
from cmn_edge.render import pair_figure

#: Queries kept for toggling and explaining; older uploads are deleted (a kiosk runs for days).
MAX_QUERIES = 64
THUMB_SIZE = 320
CHIPS = 10
FIGURE_CONCEPTS = 6


@dataclass
class Query:
    path: Path  # the uploaded photo, kept for the explanation figure
    vector: np.ndarray  # [C] unit embedding


def open_index(index_dir: Path, model: str | None, precision: str | None, threads: int | None):
    """The index and an embedder for the model it was built with (others are refused).

    The kiosk only reads: it may run while another program (``cmn-edge index sync``, the
    camera watcher) adds to the same index, and its searches follow those additions.
    """
    index = Index.open(index_dir)
    embedder = embedder_for_index(index.index, model, precision, threads)
    index = Index(index.index, embedder)
    index.index.load_view()  # verify and load the graph now: a broken index fails at start
    if len(index) == 0:
        raise ConceptIndexError(f"{index_dir}: the index is empty; add photos to it first")
    return index, embedder


def concept_labels(index: Index, embedder: Embedder) -> dict[int, str]:
    """Part names from the index (set by people), else from the model, else none."""
    names = {i: n for i, n in enumerate(index.parts.model_names(embedder.metadata)) if n}
    names.update(index.concept_names)
    return names


def create_app(
    index_dir: Path,
    model: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    k: int = 8,
) -> Flask:
    index, embedder = open_index(index_dir, model, precision, threads)
    names = concept_labels(index, embedder)
    parts = index.parts
    uploads = Path(tempfile.mkdtemp(prefix="cmn-kiosk-"))
    queries: OrderedDict[str, Query] = OrderedDict()
    lock = threading.Lock()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 25 * 1024 * 1024
    app.config["UPLOADS"] = uploads  # so whoever runs the app can delete it on exit

    def label(concept: int) -> str:
        return names.get(concept, f"#{concept}")

    def error(message: str, status: int = 400):
        return jsonify(error=message), status

    def remember(query: Query) -> str:
        token = uuid.uuid4().hex
        with lock:
            queries[token] = query
            while len(queries) > MAX_QUERIES:
                _, old = queries.popitem(last=False)
                shutil.rmtree(old.path.parent, ignore_errors=True)
        return token

    def recall(token: str) -> Query | None:
        with lock:
            return queries.get(token)

    @app.get("/")
    def page():
        return render_template(
            "index.html", count=len(index), model=embedder.model_id, k=k, noun=parts.noun
        )

    @app.post("/api/query")
    def new_query():
        upload = request.files.get("photo")
        if upload is None or not upload.filename:
            return error("no photo in the request (form field 'photo')")
        folder = Path(tempfile.mkdtemp(dir=uploads))
        path = folder / (secure_filename(upload.filename) or "photo")
        upload.save(path)
        try:
            vector = embedder.embed([path])[0]
        except ImageError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            reason = str(exc).removeprefix(f"{path}: ")
            return error(f"{upload.filename}: {reason}")
        token = remember(Query(path, vector))
        # The chips: the parts that contribute most to the scores of the top results.
        hits = index.search(vector, k, explain=CHIPS)
        totals: dict[int, float] = {}
        for hit in hits:
            for term in hit.top_concepts or []:
                totals[term["index"]] = totals.get(term["index"], 0.0) + term["contribution"]
        top = sorted(totals, key=lambda i: -totals[i])[:CHIPS]
        values = parts.values(vector)
        concepts = [
            {
                "index": i,
                "label": label(i),
                "value": float(values[i]),
                "contribution": totals[i],
            }
            for i in top
        ]
        return jsonify(token=token, concepts=concepts)

    @app.get("/api/search")
    def search():
        query = recall(request.args.get("q", ""))
        if query is None:
            return error("unknown or expired query; upload the photo again", 404)
        try:
            off = [int(c) for c in request.args.get("off", "").split(",") if c.strip()]
            wanted = max(1, int(request.args.get("k", k)))
            hits = index.search(query.vector, wanted, exclude=off)
        except (ValueError, ConceptIndexError) as exc:
            return error(str(exc).splitlines()[0])
        results = [
            {
                "id": h.id,
                "name": Path(h.path).name if h.path else f"item {h.id}",
                "score": h.score,
                "thumb": f"/thumb/{h.id}",
            }
            for h in hits
        ]
        return jsonify(results=results, off=off)

    @app.get("/thumb/<int:item_id>")
    def thumb(item_id: int):
        if item_id not in index:
            return error(f"no item {item_id}", 404)
        path, _ = index.item(item_id)
        try:
            image = open_image(path)
        except ImageError as exc:  # the gallery file moved or broke since it was indexed
            return error(str(exc), 404)
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        return _send(image, "JPEG", max_age=3600)

    @app.get("/explain/<token>/<int:item_id>.png")
    def why(token: str, item_id: int):
        query = recall(token)
        if query is None or item_id not in index:
            return error("unknown query or item", 404)
        path, _ = index.item(item_id)
        try:
            off = {
                index.resolve_part(c) for c in request.args.get("off", "").split(",") if c.strip()
            }
            result = explain(
                query.path, path, embedder, top=FIGURE_CONCEPTS + len(off), names=names
            )
        except (ImageError, ConceptIndexError) as exc:
            return error(str(exc).splitlines()[0], 404)
        return _send(pair_figure(without(result, off), scale=2), "PNG")

    return app


def without(result: Explanation, off: set[int]) -> Explanation:
    """The explanation of the score the page shows when parts are switched off.

    Leaving part i out of the query removes exactly its term (q_i g_i, summed over a group's
    block) from the score (the index's ``exclude``), so the figure's score is the sum of the
    remaining terms and its top parts are the strongest of those.
    """
    if not off:
        return result
    contributions = result.contributions.copy()
    contributions[list(off)] = 0.0
    score = float(contributions.sum())

    def terms(old: tuple[ConceptTerm, ...]) -> tuple[ConceptTerm, ...]:
        kept = [t for t in old if t.index not in off][:FIGURE_CONCEPTS]
        return tuple(t._replace(share=share_of(t.contribution, score)) for t in kept)

    return dataclasses.replace(
        result,
        score=score,
        contributions=contributions,
        top=terms(result.top),
        against=terms(result.against),
    )


def _send(image: Image.Image, fmt: str, max_age: int | None = None):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return send_file(buffer, mimetype=f"image/{fmt.lower()}", max_age=max_age)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Find similar photos, with concept control.")
    parser.add_argument("--index", type=Path, required=True, help="A cmn-edge index directory.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on.")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("-k", type=int, default=8, help="How many results to show.")
    parser.add_argument("--model", default=None, help="Default: the index's model.")
    parser.add_argument("--precision", choices=["int8", "fp32"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads.")
    args = parser.parse_args(argv)
    try:
        app = create_app(args.index, args.model, args.precision, args.threads, args.k)
    except (ConceptIndexError, ValueError, FileNotFoundError) as exc:
        parser.exit(1, f"error: {str(exc).splitlines()[0]}\n")
    # SIGTERM (systemd, docker stop) exits through ``finally`` so the uploads are deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"kiosk: http://{args.host}:{args.port}/", flush=True)
    try:
        app.run(host=args.host, port=args.port, threaded=True)
    finally:
        shutil.rmtree(app.config["UPLOADS"], ignore_errors=True)


if __name__ == "__main__":
    main()
