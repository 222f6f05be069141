"""The security errors carry OpenAI's own status, type and code strings."""

from __future__ import annotations

from agent.errors import AgentError, AuthenticationError, PermissionDeniedError, RateLimitError


def test_authentication_error_envelope_is_the_documented_one() -> None:
    error = AuthenticationError("Incorrect API key provided.")
    assert isinstance(error, AgentError) and error.status == 401
    assert error.envelope() == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_permission_denied_error_says_which_check_refused() -> None:
    error = PermissionDeniedError("Host 'evil.example' is not a name of this device", code="host_not_allowed")
    assert error.status == 403
    assert error.envelope()["error"] | {"message": ""} == {
        "message": "",
        "type": "permission_error",
        "param": None,
        "code": "host_not_allowed",
    }
    assert PermissionDeniedError("no").code == "permission_denied"


def test_rate_limit_error_matches_openai_rpm_envelope_and_carries_headers() -> None:
    headers = {"Retry-After": "2", "x-ratelimit-remaining-requests": "0"}
    error = RateLimitError("Rate limit reached for requests", retry_after=2, headers=headers)
    assert (error.status, error.retry_after, error.headers) == (429, 2, headers)
    assert error.headers is not headers  # its own copy
    assert error.envelope()["error"] == {
        "message": "Rate limit reached for requests",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
