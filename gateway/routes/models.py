"""GET /v1/models: the served model and its aliases, as an OpenAI-style list."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from gateway.auth import ApiKeyDep
from gateway.schemas.common import ErrorResponse
from gateway.service import served_names

router = APIRouter(tags=["models"])
_STARTED_S = int(time.time())


class ModelCard(BaseModel):
    id: str = Field(description="A name requests may put in `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the gateway started.")
    owned_by: str = "rerank-gateway"
    root: str = Field(description="The served model this name stands for.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get(
    "/v1/models",
    response_model=ModelList,
    summary="The served model name and its aliases",
    responses={401: {"model": ErrorResponse, "description": "Missing or wrong API key."}},
)
async def list_models(request: Request, _auth: ApiKeyDep) -> ModelList:
    names = served_names(request.app.state.settings)
    return ModelList(data=[ModelCard(id=n, created=_STARTED_S, root=names[0]) for n in names])
