"""`bbfl serve`: a frozen model as Language-Model-as-a-Service (soft prompts in, class scores out).

BBFL_SERVE_TOKEN=secret bbfl serve --port 8000                   # the embedded MiniLM
BBFL_SERVE_TOKEN=secret bbfl bbt --model http://127.0.0.1:8000   # BBT against it, from another shell
"""

from __future__ import annotations

import typer

from bbfl.cli._app import (
    DEVICE,
    DTYPE,
    HEAD,
    MAX_LENGTH,
    MODEL,
    PROMPT_ATTENTION,
    PROMPT_PLACEMENT,
    PROMPT_POSITION,
    app,
    console,
    fail,
)
from bbfl.exceptions import BBFLError, ConfigError


@app.command()
def serve(
    model: str | None = MODEL,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    token: str | None = typer.Option(
        None,
        envvar="BBFL_SERVE_TOKEN",
        show_default=False,
        help="Bearer token clients must send (or $BBFL_SERVE_TOKEN).",
    ),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without a token (only on a trusted network)."),
    head: str = HEAD,
    device: str = DEVICE,
    dtype: str = DTYPE,
    prompt_attention: str = PROMPT_ATTENTION,
    prompt_placement: str = PROMPT_PLACEMENT,
    prompt_position: str = PROMPT_POSITION,
    max_length: int = MAX_LENGTH,
    max_request_mb: float = typer.Option(32.0, help="Largest request body, MiB (larger: HTTP 413)."),
    max_prompts: int = typer.Option(256, help="Candidate prompts per scores request (more: HTTP 422)."),
    max_examples: int = typer.Option(1024, help="Examples / inputs per request (more: HTTP 422)."),
    max_prompt_length: int = typer.Option(256, help="Soft-prompt tokens L per candidate (more: HTTP 422)."),
    max_batch_texts: int = typer.Option(
        64, help="Texts per forward when concurrent embeddings / completions / chat requests are batched together."
    ),
    batch_wait_ms: float = typer.Option(
        2.0, help="How long a text request waits for others to share its forward (0: only what already queued)."
    ),
    max_classes: int = typer.Option(
        64,
        help="Classes per task in a scores / features request (more: HTTP 422). Each class is a label word or "
        "description the model reads for every request.",
    ),
    body_timeout: float = typer.Option(
        30.0,
        help="Seconds a request body may take to arrive in full; a body shorter than its Content-Length "
        "is answered HTTP 408 and the connection closed.",
    ),
) -> None:
    """Serve a local model over HTTP: /v1/bbfl/scores (soft prompts in, class scores out: BBT, FedBPT,
    ZooPFL), /v1/bbfl/info, /v1/bbfl/token_embeddings and /v1/bbfl/features (what those methods' clients
    need), OpenAI-compatible /v1/embeddings, /v1/completions (logprobs; echo for a causal LM) and
    /v1/chat/completions (next-token top_logprobs), and /health. Concurrent text requests are batched."""
    try:
        from bbfl.experiment import BlackBoxConfig
        from bbfl.serve import ServeLimits
        from bbfl.serve import serve as run_server
    except ImportError as exc:
        fail(ConfigError(f"`bbfl serve` needs `pip install 'bbfl[serve]'` (fastapi, uvicorn): {exc}"))
    if model is not None and model.startswith(("http://", "https://")):
        fail(ConfigError("`bbfl serve --model` takes a local model dir or hub name, not a URL"))
    if not token and not no_auth:
        fail(ConfigError("give a bearer token (--token or $BBFL_SERVE_TOKEN), or --no-auth to serve without one"))
    if max_request_mb <= 0 or min(max_prompts, max_examples, max_prompt_length, max_batch_texts) < 1:
        fail(
            ConfigError(
                "--max-request-mb, --max-prompts, --max-examples, --max-prompt-length and --max-batch-texts "
                f"must be positive (got {max_request_mb}, {max_prompts}, {max_examples}, {max_prompt_length}, "
                f"{max_batch_texts})"
            )
        )
    if max_classes < 2:
        fail(ConfigError(f"--max-classes must be at least 2, got {max_classes}"))
    if not 0 < body_timeout <= 3600:
        fail(ConfigError(f"--body-timeout must be in (0, 3600] seconds, got {body_timeout}"))
    if not 0 <= batch_wait_ms <= 1000:
        fail(ConfigError(f"--batch-wait-ms must be between 0 and 1000, got {batch_wait_ms}"))
    try:
        blackbox = BlackBoxConfig(
            model,
            head=head,
            device=device,
            dtype=dtype,
            prompt_attention=prompt_attention,
            prompt_placement=prompt_placement,
            prompt_position=prompt_position,
            max_length=max_length,
        ).build()
    except BBFLError as exc:
        fail(exc)
    limits = ServeLimits(
        int(max_request_mb * 2**20),
        max_prompts,
        max_examples,
        max_prompt_length=max_prompt_length,
        max_batch_texts=max_batch_texts,
        batch_wait_ms=batch_wait_ms,
        max_classes=max_classes,
        body_timeout_s=body_timeout,
    )
    auth = "no auth" if no_auth else "bearer token required"
    console.print(f"serving {blackbox.model_name} ({blackbox.head} head) on http://{host}:{port} ({auth})")
    run_server(blackbox, host, port, None if no_auth else token, limits)
