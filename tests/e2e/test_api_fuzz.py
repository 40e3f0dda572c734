"""Hostile input: schemathesis over /openapi.json, the hostile-WAV corpus, a chunked upload past 20 MB."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from tests.e2e.conftest import send_chunked

pytestmark = pytest.mark.e2e

# Billing's routes (Stripe's webhook too) belong to billing's own tests; DELETE /v1/account would purge the fuzzing
# account mid-run.
NOT_FUZZED_PATHS = r"^/v1/(signup|checkout|webhooks/stripe)"
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]


@pytest.fixture(scope="module")
def fuzz_key(client) -> dict:
    return client.new_key(label="fuzz", rate_per_minute=100_000, max_concurrent=100)


def test_openapi_fuzz_has_no_server_error_and_matches_the_document(client, fuzz_key):
    """Every documented operation, with generated valid and invalid input, authenticated as a real key."""
    api = (schemathesis.openapi.from_url(f"{client.base_url}/openapi.json")
           .exclude(path_regex=NOT_FUZZED_PATHS).exclude(method="DELETE", path="/v1/account"))
    failures: dict[str, str] = {}
    calls = {"n": 0}
    started = time.monotonic()
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 17
    for operation, mode in [(op, mode) for op in operations for mode in GenerationMode]:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate], database=None)
        def exercise(case) -> None:  # type: ignore[no-untyped-def]
            calls["n"] += 1
            case.call_and_validate(base_url=client.base_url, headers=client.auth(fuzz_key), checks=CHECKS,
                                   timeout=30)

        try:
            exercise()
        except Unsatisfiable:  # an operation with no input at all has no invalid variant
            continue
        except Exception as exc:  # noqa: BLE001 - collected so one run reports every operation's failure
            failures[f"{operation.label} ({mode.value})"] = f"{type(exc).__name__}: {exc}"[:2000]
    elapsed = time.monotonic() - started
    print(f"fuzzed {len(operations)} operations with {calls['n']} requests in {elapsed:.1f}s")
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    assert elapsed < 120


def test_fuzzing_left_the_platform_healthy(client, fuzz_key):
    assert client.http.get("/v1/health").json()["status"] == "ok"
    assert client.http.get("/v1/voices", headers=client.auth(fuzz_key)).status_code == 200
    assert client.platform.exited() == {}


def test_openapi_documents_every_route_header_and_error(client):
    spec = client.http.get("/openapi.json").json()
    ops = {(m.upper(), p): o for p, item in spec["paths"].items() for m, o in item.items()}
    authed = [k for k, o in ops.items() if "401" in o["responses"]]
    assert len(authed) >= 15
    for (method, path), op in ops.items():
        if path.startswith(("/v1/signup", "/v1/checkout", "/v1/webhooks/stripe")):
            continue
        for status, answer in op["responses"].items():
            # The readiness probe's 503 says what is failing, in the probe's own body.
            if status.startswith(("4", "5")) and (path, status) != ("/v1/ready", "503"):
                ref = answer["content"]["application/json"]["schema"]["$ref"]
                # The OpenAI-compatible routes answer errors in OpenAI's shape, so its SDKs read them.
                body = "OpenAIErrorBody" if path.startswith(("/v1/audio/", "/v1/models")) else "ErrorBody"
                assert ref == f"#/components/schemas/{body}", (method, path, status)
        if "Authorization" in str(op.get("security")) or "HTTPBearer" in str(op.get("security")):
            assert "401" in op["responses"], (method, path)
    expected_errors = {
        ("POST", "/v1/keys"): {"401", "422"}, ("PATCH", "/v1/keys/{key_id}"): {"401", "404", "422"},
        ("DELETE", "/v1/keys/{key_id}"): {"401", "404"},
        ("POST", "/v1/voices"): {"400", "401", "409", "413", "422", "429"}, ("GET", "/v1/voices"): {"401", "429"},
        ("POST", "/v1/uploads"): {"409", "413"},
        ("GET", "/v1/voices/{voice_id}"): {"401", "404", "429"},
        ("DELETE", "/v1/voices/{voice_id}"): {"401", "404", "429"},
        ("POST", "/v1/synthesize"): {"400", "401", "404", "409", "422", "429", "503"},
        ("GET", "/v1/jobs/{job_id}"): {"401", "404", "429"}, ("GET", "/v1/jobs/{job_id}/audio"): {"401", "404", "429"},
    }
    for route, statuses in expected_errors.items():
        assert statuses <= set(ops[route]["responses"]), (route, ops[route]["responses"].keys())
        for status in statuses:  # each error names its stable codes
            assert ops[route]["responses"][status]["x-error-codes"], (route, status)
        if "429" in statuses:
            assert "Retry-After" in ops[route]["responses"]["429"]["headers"]
    codes = {status: set(answer.get("x-error-codes", [])) for status, answer in
             ops[("POST", "/v1/synthesize")]["responses"].items()}
    assert {"text_too_long", "invalid_backend", "unsupported_language", "idempotency_key_reused"} <= codes["422"]
    assert codes["404"] == {"voice_not_found"}
    assert codes["429"] == {"rate_limited", "too_many_concurrent_requests", "too_many_pending_jobs"}
    assert "work_queue_full" in codes["503"]
    voice_codes = ops[("POST", "/v1/voices")]["responses"]["422"]["x-error-codes"]
    assert {"not_wav", "duration_out_of_range", "file_too_large"} <= set(voice_codes)
    synth = ops[("POST", "/v1/synthesize")]
    for status in ("200", "202"):
        headers = set(synth["responses"][status]["headers"])
        assert {"X-Cache", "X-Voice-Id", "X-Backend", "X-Synthesis-Time-Ms"} <= headers
    assert set(synth["responses"]["200"]["content"]) >= {"audio/wav", "audio/mpeg", "audio/ogg", "audio/flac"}
    assert "X-Job-Id" in ops[("GET", "/v1/jobs/{job_id}/audio")]["responses"]["200"]["headers"]
    for route in (("POST", "/v1/synthesize"), ("POST", "/v1/voices")):
        assert "Idempotency-Key" in {p["name"] for p in ops[route].get("parameters", []) if p["in"] == "header"}
    assert "multipart/form-data" in ops[("POST", "/v1/voices")]["requestBody"]["content"]
    assert ops[("POST", "/v1/synthesize")]["requestBody"]["content"]["application/json"]["schema"]
    docs = client.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


# The hostile-WAV corpus ---------------------------------------------------------------------------------
def _stored(client, account_id: str) -> list[Path]:
    root = Path(client.env["STORAGE_ROOT"])
    return [p for p in root.rglob("*") if p.is_file() and account_id in p.parts]


def test_hostile_wavs_are_refused_cleanly_and_store_nothing(client, wavs):
    corpus = wavs.hostile_wavs()
    rejected = [h for h in corpus if h.expected_code is not None]
    assert len(corpus) >= 40 and len(rejected) >= 30
    key = client.new_key(label="hostile", rate_per_minute=100_000, max_concurrent=100)
    for hostile in rejected:
        r = client.http.post("/v1/voices", headers=client.auth(key), data={"name": hostile.name},
                             files={"ref_audio": ("x.wav", io.BytesIO(hostile.data), "audio/wav")})
        assert 400 <= r.status_code < 500, (hostile.name, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), (hostile.name, body)
        allowed = {hostile.expected_code, "file_too_large" if hostile.expected_code == "too_large" else None,
                   "missing_field" if hostile.expected_code == "empty_audio" else None}
        assert body["error"]["code"] in allowed, (hostile.name, body)
    listed = client.http.get("/v1/voices", headers=client.auth(key)).json()
    assert [v for v in listed if v["kind"] == "custom"] == []
    assert _stored(client, key["account_id"]) == []


def test_hostile_but_readable_wavs_are_accepted_with_an_honest_grade(client, wavs):
    accepted = [h for h in wavs.hostile_wavs() if h.expected_code is None]
    key = client.new_key(label="hostile-ok", rate_per_minute=100_000)
    grades = {}
    for hostile in accepted:
        r = client.create_voice(key, hostile.data, name=hostile.name)
        assert r.status_code == 201, (hostile.name, r.text)
        grades[hostile.name] = r.json()["quality"]["grade"]
    assert {grades[n] for n in ("silence_10s", "very_quiet_10s", "clipped_10s", "white_noise_10s")} == {"poor"}
    references = [p for p in _stored(client, key["account_id"]) if p.suffix == ".wav"]
    assert len(references) == len(accepted)


# Streaming refusal --------------------------------------------------------------------------------------
def test_oversized_chunked_upload_is_refused_before_it_is_all_read(client, wavs):
    """64 MB sent chunked, no Content-Length: the 422 arrives after about 20 MB, not after 64."""
    key = client.new_key(label="chunked")
    boundary = "hostileboundary"
    total_payload = 64 * 1024 * 1024
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n--{boundary}\r\n"
            "Content-Disposition: form-data; name=\"ref_audio\"; filename=\"big.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    pieces = [head, wavs.valid_wav(5.0)] + [b"\x00" * (256 * 1024)] * (total_payload // (256 * 1024)) + \
        [f"\r\n--{boundary}--\r\n".encode()]
    status, body, sent, finished = send_chunked(client, "/v1/voices", pieces, {
        "Authorization": f"Bearer {key['api_key']}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert (status, body["error"]["code"]) == (422, "file_too_large"), body
    assert not finished
    sent_mb = sent / 2**20
    print(f"chunked upload: 422 after {sent_mb:.1f} MB of {total_payload / 2**20:.0f} MB")
    assert 20 < sent_mb < 30, f"{sent_mb:.1f} MB consumed before the answer"
    assert _stored(client, key["account_id"]) == []
