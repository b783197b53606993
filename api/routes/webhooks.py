"""``/v1/webhooks``: subscribe to job state changes, list and remove subscriptions, and read how
their deliveries go."""

# No `from __future__ import annotations`: FastAPI must see route annotations that use local names.
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from api import schemas
from api.deps import ERRORS, V1, Cursor, Plane, admin_only
from service.settings import Settings
from service.webhooks import Delivery, DeliveryStatus, Webhook

NOT_FOUND = {404: {**ERRORS[404], "description": "No such webhook"}}


def router(settings: Settings) -> APIRouter:
    """The webhook routes, built per app as the job routes are (a page's largest size is a setting).
    Admin tokens only: a subscription sees every team's job changes."""
    webhooks = APIRouter(prefix=V1, dependencies=[Depends(admin_only)], responses={403: ERRORS[403]})

    @webhooks.post(
        "/webhooks",
        status_code=201,
        response_model=schemas.WebhookCreated,
        responses={400: ERRORS[400], 413: ERRORS[413], 422: ERRORS[422]},
        summary="Subscribe to job state changes",
    )
    def create_webhook(
        plane: Plane, http: Request, subscription: schemas.WebhookRequest
    ) -> schemas.WebhookCreated:
        """From now on, every change of any job into one of ``events`` (every state without them)
        is POSTed to ``url`` as JSON, signed with the secret (the ``Hutch-Signature`` header,
        README: Webhooks), and sent again with growing waits until the receiver answers 2xx or
        HUTCH_WEBHOOK_MAX_ATTEMPTS sendings failed; a job's changes arrive in their order. The
        answer is the only one that shows the secret."""
        hook = plane.subscribe(subscription.url, subscription.events, subscription.secret)
        http.state.audit_object = hook.id  # the audit line names the webhook (api/audit.py)
        return schemas.WebhookCreated(**_webhook(hook), secret=hook.secret)

    @webhooks.get("/webhooks", response_model=schemas.WebhookList, summary="List webhooks")
    def list_webhooks(plane: Plane) -> schemas.WebhookList:
        """Every webhook, oldest first (their secrets as hints)."""
        return schemas.WebhookList(webhooks=[schemas.Webhook(**_webhook(h)) for h in plane.list_webhooks()])

    @webhooks.get(
        "/webhooks/{webhook_id}", response_model=schemas.Webhook, responses=NOT_FOUND, summary="Get a webhook"
    )
    def get_webhook(plane: Plane, webhook_id: str) -> schemas.Webhook:
        """The webhook, its secret as a hint."""
        return schemas.Webhook(**_webhook(plane.webhook(webhook_id)))

    @webhooks.delete(
        "/webhooks/{webhook_id}", status_code=204, responses=NOT_FOUND, summary="Remove a webhook"
    )
    def delete_webhook(plane: Plane, http: Request, webhook_id: str) -> Response:
        """Stop sending to the webhook: it and its deliveries are removed, the pending ones unsent."""
        http.state.audit_object = webhook_id
        plane.unsubscribe(webhook_id)
        return Response(status_code=204)

    @webhooks.get(
        "/webhooks/{webhook_id}/deliveries",
        response_model=schemas.DeliveryPage,
        responses={**NOT_FOUND, 422: ERRORS[422]},
        summary="A webhook's deliveries",
    )
    def webhook_deliveries(
        plane: Plane,
        webhook_id: str,
        status: Annotated[
            list[schemas.DeliveryStatus] | None, Query(description="Only deliveries in these statuses.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_size)] = 50,
        cursor: Cursor = None,
    ) -> schemas.DeliveryPage:
        """The webhook's deliveries newest first, one page at a time: each state change, its
        status, sendings so far, the last failure and the next try. Delivered and given-up ones
        are kept 7 days."""
        statuses = [DeliveryStatus(value) for value in status or []]
        page = plane.deliveries(webhook_id, statuses, limit, cursor)
        found = [schemas.WebhookDelivery(**_delivery(d)) for d in page.deliveries]
        return schemas.DeliveryPage(deliveries=found, next_cursor=page.next_cursor)

    return webhooks


def _webhook(hook: Webhook) -> dict[str, Any]:
    """The API's view of a webhook: every field of :class:`schemas.Webhook`, the secret as a hint."""
    events = list(hook.events) if hook.events is not None else None
    return {"id": hook.id, "url": hook.url, "events": events, "secret_hint": hook.secret_hint,
            "created_at": hook.created_at}  # fmt: skip


def _delivery(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.seq, "event_id": delivery.event_id, "job_id": delivery.job_id,
        "job_attempt": delivery.job_attempt, "state": delivery.state, "at": delivery.at,
        "status": delivery.status.value, "attempts": delivery.attempts, "last_error": delivery.last_error,
        "next_attempt_at": delivery.next_attempt_at, "finished_at": delivery.finished_at,
    }  # fmt: skip
