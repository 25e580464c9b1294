"""GET /v1/models (OpenAI-style), GET /models and /infinity/models (Infinity): the served names."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from gateway.auth import ApiKeyDep
from gateway.compose import served_names
from gateway.schemas.common import ErrorResponse
from gateway.schemas.infinity import InfinityModel, InfinityModelList

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


async def infinity_models(request: Request, _auth: ApiKeyDep) -> InfinityModelList:
    names = served_names(request.app.state.settings)
    service = getattr(request.app.state, "service", None)
    engine = getattr(service, "engine", None)
    backend = engine.info.name if engine is not None else "loading"
    return InfinityModelList(data=[InfinityModel(id=n, created=_STARTED_S, backend=backend) for n in names])


for _path in ("/models", "/infinity/models"):
    router.add_api_route(
        _path,
        infinity_models,
        methods=["GET"],
        response_model=InfinityModelList,
        summary="The served model name and its aliases (Infinity's shape)",
        responses={401: {"model": ErrorResponse, "description": "Missing or wrong API key."}},
        operation_id="models" + _path.replace("/", "_"),
    )
