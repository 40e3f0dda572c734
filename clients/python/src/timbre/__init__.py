"""Timbre: the Python SDK of the Timbre voice-cloning text-to-speech API.

    from timbre import Timbre
    client = Timbre()                      # TIMBRE_API_KEY, TIMBRE_BASE_URL
    voice = client.voices.create("me.wav", name="me", text="What I say in the recording.")
    audio = client.speech.generate("Hello", voice=voice.voice_id)
    audio.save("hello.wav")
"""
from . import webhooks
from ._async_client import AsyncTimbre
from ._client import Timbre
from ._errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    GoneError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    TimbreError,
    WaitTimeoutError,
    WebhookVerificationError,
)
from .models import (
    ApiKey,
    ApiKeyCreated,
    Audio,
    Health,
    Job,
    Purge,
    Upload,
    Usage,
    Voice,
    Webhook,
    WebhookCreated,
    WebhookDelivery,
    WebhookEvent,
)

__version__ = "0.1.0"
__all__ = ["Timbre", "AsyncTimbre", "webhooks", "TimbreError", "APIError", "APIConnectionError", "APITimeoutError",
           "AuthenticationError", "ConflictError", "GoneError", "InvalidRequestError", "JobFailedError",
           "NotFoundError", "PermissionDeniedError", "QuotaExceededError", "RateLimitError", "ServerError",
           "WaitTimeoutError", "WebhookVerificationError", "ApiKey", "ApiKeyCreated", "Audio", "Health", "Job",
           "Purge", "Upload", "Usage", "Voice", "Webhook", "WebhookCreated", "WebhookDelivery", "WebhookEvent"]
