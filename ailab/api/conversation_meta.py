"""Conversation titles and text search: `PATCH /conversations/{id}`, `GET /conversations/search`.

Included before the core conversation routes, so `search` is never taken for an id.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request

from ailab.api.schemas import (
    ConversationsResponse,
    ConversationSummaryOut,
    RenameRequest,
    StatusResponse,
)
from ailab.gateway import Gateway

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


@router.get("/conversations/search", response_model=ConversationsResponse)
async def search_conversations(
    request: Request, q: str = Query(..., min_length=1, max_length=200)
) -> ConversationsResponse:
    summaries = await _gateway(request).store.list_conversations(q)
    return ConversationsResponse(
        conversations=[ConversationSummaryOut(**s.model_dump(mode="json")) for s in summaries]
    )


@router.patch("/conversations/{conversation_id}", response_model=StatusResponse)
async def rename_conversation(
    request: Request, conversation_id: str, body: RenameRequest
) -> StatusResponse:
    title = " ".join(body.title.split()) if body.title else None
    if not await _gateway(request).store.rename_conversation(conversation_id, title or None):
        raise HTTPException(404, f"no conversation {conversation_id!r}")
    return StatusResponse(status="ok")
