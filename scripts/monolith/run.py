"""Creates the monolith's schema, then serves it with uvicorn (one worker per core)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import uvicorn  # noqa: E402

if __name__ == "__main__":
    from app import create_schema  # noqa: E402 (imports the model once to fail early)

    create_schema(os.environ["MONOLITH_DATABASE_URL"])
    uvicorn.run("app:app", host="127.0.0.1", port=int(os.environ["MONOLITH_PORT"]),
                workers=int(os.environ.get("MONOLITH_WORKERS", str(os.cpu_count() or 1))),
                log_level="warning", access_log=False, loop="uvloop", http="httptools",
                app_dir=os.path.dirname(__file__))
