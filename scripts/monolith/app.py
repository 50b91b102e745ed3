"""The Python monolith MedAI Flow replaces, as a speed baseline measured in the same run.

One FastAPI process per core doing, per request, what the mesh does: check an EdDSA bearer
token (issuer, audience, expiry), decode the PNG, convert to grey, resize to the model's input,
run ONNX Runtime, and record the result and a hash-chained ledger entry in PostgreSQL in one
durable transaction (synchronous_commit on), then answer JSON. It is a benchmark baseline,
not a product: no validation beyond decoding, no de-identification, no rate limits.

Environment: MONOLITH_DATABASE_URL, MONOLITH_MODEL (path to the .onnx file),
MONOLITH_PUBLIC_KEY (Ed25519 public key, PEM), MONOLITH_INPUT_SIZE (default 64).
"""

import hashlib
import io
import json
import os
import uuid

import jwt
import numpy as np
import onnxruntime
import psycopg_pool
from fastapi import FastAPI, HTTPException, Request, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

SIZE = int(os.environ.get("MONOLITH_INPUT_SIZE", "64"))
PUBLIC_KEY = open(os.environ["MONOLITH_PUBLIC_KEY"], "rb").read()

options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = onnxruntime.InferenceSession(os.environ["MONOLITH_MODEL"], options)
input_name = session.get_inputs()[0].name

pool = psycopg_pool.ConnectionPool(os.environ["MONOLITH_DATABASE_URL"], min_size=4, max_size=16, open=True)
app = FastAPI()
GENESIS = bytes(32)


@app.post("/predict")
async def predict(request: Request) -> Response:
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise HTTPException(401, "missing token")
    try:
        claims = jwt.decode(header[7:], PUBLIC_KEY, algorithms=["EdDSA"],
                            audience="medai-monolith", issuer="medai-monolith")
    except jwt.PyJWTError:
        raise HTTPException(401, "invalid token")
    body = await request.body()
    # Image work, the model and the durable commit run in the thread pool, as a sync FastAPI
    # endpoint would, so commits of concurrent requests overlap.
    answer = await run_in_threadpool(predict_sync, claims["sub"], body)
    return Response(answer, media_type="application/json")


def predict_sync(subject: str, body: bytes) -> bytes:
    try:
        image = Image.open(io.BytesIO(body)).convert("L").resize((SIZE, SIZE), Image.BILINEAR)
    except Exception:
        raise HTTPException(400, "undecodable image")
    tensor = (np.asarray(image, dtype=np.float32) / 255.0).reshape(1, SIZE, SIZE, 1)
    scores = session.run(None, {input_name: tensor})[0][0].tolist()
    image_sha256 = hashlib.sha256(body).hexdigest()
    result_id = str(uuid.uuid4())
    context = json.dumps({"image_sha256": image_sha256, "scores": scores}, sort_keys=True)
    with pool.connection() as connection, connection.transaction():
        connection.execute(
            "INSERT INTO results (id, subject, image_sha256, scores) VALUES (%s, %s, %s, %s)",
            (result_id, subject, image_sha256, json.dumps(scores)))
        # One writer at a time extends the chain, as the audit service does.
        connection.execute("SELECT pg_advisory_xact_lock(42)")
        head = connection.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        seq, previous = (head[0] + 1, bytes(head[1])) if head else (1, GENESIS)
        entry = hashlib.sha256(previous + f"{seq}|{subject}|INFERENCE|{result_id}|{context}".encode()).digest()
        connection.execute(
            "INSERT INTO ledger (seq, actor, action, resource, context, prev_hash, hash) "
            "VALUES (%s, %s, 'INFERENCE', %s, %s, %s, %s)",
            (seq, subject, result_id, context, previous, entry))
    return json.dumps({"result_id": result_id, "scores": scores, "ledger_seq": seq}).encode()


def create_schema(url: str) -> None:
    import psycopg
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS results (id uuid PRIMARY KEY, subject text, "
                           "image_sha256 text, scores jsonb, created timestamptz DEFAULT now())")
        connection.execute("CREATE TABLE IF NOT EXISTS ledger (seq bigint PRIMARY KEY, actor text, "
                           "action text, resource text, context text, prev_hash bytea, hash bytea, "
                           "created timestamptz DEFAULT now())")
