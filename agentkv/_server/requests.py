"""What the server accepts: OpenAI request bodies checked field by field, mapped to Llama calls.

A body that is not a JSON object, a known field of the wrong type or out of range, a feature
agentkv does not serve (``n`` > 1, ``logprobs``, tools) or an agent id that is too long or holds
control characters is refused with :class:`BadRequest`, which the app turns into OpenAI's error
JSON with status 400, before anything reaches a worker. Unknown fields are ignored, as OpenAI's
own server ignores what it does not know of a newer client.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["BadRequest", "MAX_AGENT_ID", "agent_of", "chat_call", "completion_call", "check_agent_id"]

MAX_AGENT_ID = 256


class BadRequest(ValueError):
    """A request the server refuses (status 400 unless told), with OpenAI's error fields."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.code, self.status, self.kind = param, code, status, kind

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


def check_agent_id(agent: Any, where: str) -> str:
    if not isinstance(agent, str) or not agent:
        raise BadRequest(f"{where} must be a non-empty string", param=where)
    if len(agent) > MAX_AGENT_ID:
        raise BadRequest(f"{where} is {len(agent)} characters long; at most {MAX_AGENT_ID}",
                         param=where)
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in agent):
        raise BadRequest(f"{where} must not contain control characters", param=where)
    return agent


def agent_of(header: Optional[str], body: Dict[str, Any]) -> Optional[str]:
    """The agent a request belongs to: the X-Agent-Id header, else the ``user`` field, else None."""
    if header is not None:
        return check_agent_id(header, "X-Agent-Id")
    if body.get("user") is not None:
        return check_agent_id(body["user"], "user")
    return None


def _number(body: Dict[str, Any], name: str, lo: float, hi: float) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number, not {type(value).__name__}", param=name)
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo:g} and {hi:g}, not {value:g}", param=name)
    return float(value)


def _int(body: Dict[str, Any], name: str, lo: int, hi: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, not {type(value).__name__}", param=name)
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}, not {value}", param=name)
    return value


def _stop(body: Dict[str, Any]) -> Optional[List[str]]:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        return list(stop)
    raise BadRequest("stop must be a string or a list of up to 4 non-empty strings", param="stop")


def _sampling(body: Dict[str, Any]) -> Dict[str, Any]:
    """Sampling fields shared by both endpoints, as Llama keywords (only those given)."""
    if body.get("n") not in (None, 1):
        raise BadRequest("n > 1 is not supported: one completion per request", param="n")
    if body.get("logprobs") not in (None, False, 0):
        raise BadRequest("logprobs are not supported", param="logprobs")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and
                                    isinstance(options.get("include_usage", False), bool)):
        raise BadRequest("stream_options must be an object with a boolean include_usage",
                         param="stream_options")
    kwargs: Dict[str, Any] = {}
    for name, key, lo, hi in (("temperature", "temperature", 0.0, 2.0),
                              ("top_p", "top_p", 0.0, 1.0), ("min_p", "min_p", 0.0, 1.0),
                              ("presence_penalty", "presence_penalty", -2.0, 2.0),
                              ("frequency_penalty", "frequency_penalty", -2.0, 2.0),
                              ("repeat_penalty", "repeat_penalty", 0.0, 10.0)):
        value = _number(body, name, lo, hi)
        if value is not None:
            kwargs[key] = value
    for name, lo, hi in (("top_k", 0, 1 << 20), ("seed", -(1 << 63), (1 << 64) - 1)):
        value = _int(body, name, lo, hi)
        if value is not None:
            kwargs[name] = value
    max_tokens = _int(body, "max_completion_tokens", 1, 1 << 24)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, 1 << 24)
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    stop = _stop(body)
    if stop is not None:
        kwargs["stop"] = stop
    draft = body.get("draft")  # agentkv's own: self-draft decoding for this call
    if draft is not None:
        if draft not in (True, False, "ngram"):
            raise BadRequest("draft must be true, false or \"ngram\"", param="draft")
        kwargs["draft"] = "ngram" if draft is True else draft
    return kwargs


def _content(message: Dict[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                     param=f"messages[{i}].content")


def chat_call(body: Dict[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """``create_chat_completion`` keywords for a /v1/chat/completions body, and whether it streams."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                             "developer"):
            raise BadRequest(f"messages[{i}] must be an object with a role of system, user, "
                             "assistant or developer", param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _content(m, i)})
    for unsupported in ("tools", "functions", "response_format"):
        if body.get(unsupported) not in (None, [], {"type": "text"}):
            raise BadRequest(f"{unsupported} is not supported", param=unsupported)
    kwargs = _sampling(body)
    kwargs["messages"] = clean
    return kwargs, bool(body.get("stream"))


def completion_call(body: Dict[str, Any]) -> Tuple[Dict[str, Any], bool]:
    """``create_completion`` keywords for a /v1/completions body, and whether it streams."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (one prompt per request)", param="prompt")
    for unsupported, neutral in (("echo", False), ("suffix", None), ("best_of", 1)):
        if body.get(unsupported) not in (None, neutral):
            raise BadRequest(f"{unsupported} is not supported", param=unsupported)
    kwargs = _sampling(body)
    kwargs["prompt"] = prompt
    return kwargs, bool(body.get("stream"))
