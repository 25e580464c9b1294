"""The vLLM sidecar engine: token ids over HTTP to vLLM's `/classify`, raw scores back.

Request and response shapes are vLLM's own (vllm/entrypoints/pooling/classify/protocol.py, 0.32):
    POST /classify {"model", "input": [[ids...], ...], "use_activation": false, "add_special_tokens": false}
    -> {"data": [{"index", "label", "probs": [raw], "num_classes": 1}, ...], "usage": {...}}
    errors -> {"error": {"message", "type", "param", "code"}}
The prompts are the contract's token ids (core.contract), never text: vLLM would join query and
document without the mxbai template. `use_activation: false` skips the sigmoid of the
`from_2_way_softmax` head, so `probs[0]` is logit("1") - logit("0"), the official raw score.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

import httpx

from core.contract import Prompt
from engines.base import (
    EngineFailure,
    EngineInfo,
    EngineRejected,
    EngineTimeout,
    EngineUnavailable,
    Scored,
)

log = logging.getLogger(__name__)

NAME = "vllm"
CLASSIFY_PATH = "/classify"
HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
# vLLM batches internally (continuous batching): send it large slices, several at once.
DEFAULT_MAX_BATCH_PAIRS = 128
DEFAULT_MAX_BATCH_TOKENS = 32_768
DEFAULT_MAX_CONCURRENT_BATCHES = 4
DEFAULT_HEALTH_TIMEOUT_MS = 1_000
# Statuses that mean "this batch is not servable here", not "the sidecar is sick".
_REJECTED_STATUSES = (400, 413, 422)


class SidecarMisconfigured(EngineUnavailable):
    """The sidecar answers, but does not serve the model this gateway sends (a configuration error)."""


class VllmEngine:
    """Scores prompts on a vLLM sidecar through a pooled httpx client."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        connect_timeout_ms: int = 2_000,
        request_timeout_ms: int = 30_000,
        health_timeout_ms: int = DEFAULT_HEALTH_TIMEOUT_MS,
        max_connections: int = 64,
        max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"vLLM URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.connect_timeout_s = connect_timeout_ms / 1000
        self.request_timeout_s = request_timeout_ms / 1000
        self.health_timeout_s = health_timeout_ms / 1000
        self.max_connections = max_connections
        self._info = EngineInfo(
            name=NAME,
            padded=False,
            max_batch_tokens=max_batch_tokens,
            max_batch_pairs=max_batch_pairs,
            max_concurrent_batches=max_concurrent_batches,
            precision="sidecar",
        )
        self._client: httpx.AsyncClient | None = None
        # Why the sidecar cannot serve this gateway although it is up (it serves another model), or None.
        self.config_problem: str | None = None

    @property
    def info(self) -> EngineInfo:
        return self._info

    def __repr__(self) -> str:
        return f"VllmEngine({self.base_url!r}, model={self.model!r})"

    async def start(self) -> None:
        """Create the connection pool and, if the sidecar is up, check it serves our model.

        The sidecar may still be starting: health() says when it is up (and checks the model then). One
        that is up and serves another model raises SidecarMisconfigured: every request would fall back.
        """
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                self.request_timeout_s,
                connect=self.connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_connections,
            ),
            # A sidecar is addressed directly; proxies from the environment would only get in the way.
            trust_env=False,
        )
        await self.check_served_model(log_problem=False)  # raised instead, for the caller to report
        if self.config_problem is not None:
            raise SidecarMisconfigured(self.config_problem)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def health(self) -> bool:
        """GET /health, then GET /v1/models (it must list our model), with short timeouts; never raises."""
        if self._client is None:
            return False
        try:
            resp = await self._client.get(HEALTH_PATH, timeout=self.health_timeout_s)
        except httpx.HTTPError as exc:
            log.debug("vLLM health check at %s failed: %r", self.base_url, exc)
            return False
        if resp.status_code != 200:
            return False
        await self.check_served_model()
        return self.config_problem is None

    async def check_served_model(self, *, log_problem: bool = True) -> None:
        """Set `config_problem` when the sidecar's /v1/models does not list `model`, clear it when it does.

        A sidecar that cannot be asked (down, or no such route) leaves the last verdict as it was.
        """
        assert self._client is not None
        try:
            resp = await self._client.get(MODELS_PATH, timeout=self.health_timeout_s)
            payload = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("vLLM model check at %s failed: %r", self.base_url, exc)
            return
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            return
        served = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
        if self.model in served:
            if self.config_problem is not None:
                log.info("the vLLM sidecar at %s now serves %r", self.base_url, self.model)
            self.config_problem = None
            return
        problem = (
            f"the vLLM sidecar at {self.base_url} serves {', '.join(map(repr, served)) or 'no model'}, not "
            f"{self.model!r}: set RERANK_VLLM_MODEL to the name it serves, or launch it with "
            f"--served-model-name {self.model}"
        )
        if log_problem and problem != self.config_problem:
            log.error("%s", problem)
        self.config_problem = problem

    async def score(self, prompts: Sequence[Prompt]) -> Scored:
        if not prompts:
            return Scored([], NAME)
        if self._client is None:
            raise EngineUnavailable("the vLLM engine is not started")
        body = {
            "model": self.model,
            "input": [list(p.input_ids) for p in prompts],
            "use_activation": False,
            # Token ids already carry every special token the contract wants.
            "add_special_tokens": False,
        }
        resp = await self._post(body)
        return Scored(self._parse(resp, len(prompts)), NAME)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        """POST /classify. A connection lost before the answer is tried once more, within the same bound.

        A kept-alive connection that the sidecar's server closes (its idle timeout) just as a request goes
        out on it is lost without an answer; that is no sign of a sick sidecar, and scoring is idempotent,
        so the second try (on another connection) answers. A sidecar that died fails the second try too:
        it cannot be connected to, or loses that connection as well.
        """
        assert self._client is not None
        url = f"{self.base_url}{CLASSIFY_PATH}"
        loop = asyncio.get_running_loop()
        # httpx's read timeout restarts with every byte; the outer bound caps the whole exchange.
        deadline = loop.time() + self.request_timeout_s + self.connect_timeout_s
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(
                    self._client.post(CLASSIFY_PATH, json=body), max(0.0, deadline - loop.time())
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise EngineUnavailable(f"cannot connect to the vLLM sidecar at {url}: {exc!r}") from exc
            except (httpx.TimeoutException, asyncio.TimeoutError) as exc:
                raise EngineTimeout(
                    f"the vLLM sidecar at {url} did not answer within {self.request_timeout_s:g} s"
                ) from exc
            except httpx.TransportError as exc:
                if attempt == 1:
                    log.info(
                        "the connection to the vLLM sidecar at %s was lost (%r); trying once more", url, exc
                    )
                    continue
                # Reset or closed mid-request twice: the sidecar died or restarted.
                raise EngineUnavailable(f"lost the connection to the vLLM sidecar at {url}: {exc!r}") from exc
        raise AssertionError("unreachable")

    def _parse(self, resp: httpx.Response, n: int) -> list[float]:
        if resp.status_code != 200:
            message = _error_message(resp)
            text = f"vLLM answered HTTP {resp.status_code} on {CLASSIFY_PATH}: {message}"
            if resp.status_code in _REJECTED_STATUSES:
                raise EngineRejected(text)
            raise EngineFailure(text)
        try:
            payload = resp.json()
        except ValueError as exc:
            raise EngineFailure(f"vLLM answered with invalid JSON on {CLASSIFY_PATH}: {exc}") from exc
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list) or len(data) != n:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise EngineFailure(f"vLLM returned {got} results on {CLASSIFY_PATH} for {n} prompts")
        scores: list[float | None] = [None] * n
        for pos, item in enumerate(data):
            index = item.get("index", pos) if isinstance(item, dict) else None
            probs = item.get("probs") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < n or scores[index] is not None:
                raise EngineFailure(f"vLLM returned a bad or repeated index in result {pos}: {item!r:.200}")
            if not isinstance(probs, list) or len(probs) != 1:
                width = len(probs) if isinstance(probs, list) else "no"
                raise EngineFailure(
                    f"vLLM returned {width} scores per prompt; the sidecar must run the one-logit "
                    "mxbai head (launch it with engines.vllm_launch: --hf-overrides ... from_2_way_softmax)"
                )
            value = probs[0]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EngineFailure(f"vLLM returned a non-numeric score in result {pos}: {value!r:.50}")
            scores[index] = float(value)
        return scores  # type: ignore[return-value]  # every slot was filled exactly once above


def _error_message(resp: httpx.Response) -> str:
    """vLLM's own error message (`{"error": {"message": ...}}`), or the start of the body."""
    try:
        payload = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail"))
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if err is not None:
            return str(err)[:500]
    return str(payload)[:500]
