"""Parse and check an OpenAI chat-completions request (no web framework here).

`parse_chat_request(body, limits)` turns the JSON body into the conversation
the engine renders (`r4b_edge.model.template.Message` turns), the raw image
bytes of the first user turn that carries images, and the generation options.
Anything malformed raises `APIError` with an OpenAI-style body and status 400.
Images come only as `data:` URIs: http(s) URLs and local paths are refused,
so the server never fetches a URL or opens a file a client names.
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from r4b_edge.engine.options import GenerationOptions
from r4b_edge.model.reply import history_answer
from r4b_edge.model.template import EFFORT_MODES, THINKING_MODES, Message

from .logprobs import parse_stop_logprobs

ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


#: Default number of open connections (at the limit idle ones are closed first).
DEFAULT_MAX_CONNECTIONS = 256
#: Default number of requests that may wait while one is answered (more get 503).
DEFAULT_MAX_QUEUE = 16
#: KV cache states the server keeps across requests (MiB): at R-4B's true size one conversation about
#: a photo of 4,500 positions is ~660 MiB of f16 KV
DEFAULT_PREFIX_CACHE_MB = 2048
#: Default seconds a client has to send a whole request head, and again its body.
DEFAULT_REQUEST_TIMEOUT = 30.0


@dataclass
class Limits:
    """What one request may carry."""

    max_request_bytes: int = 20 * 2**20
    max_image_pixels: int = 25_000_000
    max_images: int = 8
    max_messages: int = 256
    default_max_tokens: int = GenerationOptions.max_tokens  # the engine's own default
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds for the body to arrive


@dataclass
class ChatRequest:
    """A checked request, ready for the engine."""

    messages: list[Message]
    images: list[bytes]
    image_params: list[str]
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    model: Optional[str] = None
    extra: dict = field(default_factory=dict)
    image_tokens: Any = None  # the request's image budget: N, "auto" or "full"; None: the server's (--image-tokens)


# ---- field checkers ----------------------------------------------------------------------------
def _surrogate(text: str) -> Optional[int]:
    """Index of the first lone surrogate in `text` (not valid Unicode: UTF-8 cannot encode it), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_unicode(body: Any) -> None:
    """Every string of the request, keys included, must be valid Unicode. JSON can spell a lone
    surrogate (`"\\ud800"`) that no tokenizer or UTF-8 encoder accepts; it is refused here, once,
    with a 400 naming the field, before anything reads the text."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            i = _surrogate(node)
            if i is not None:
                raise bad(f"'{path or 'body'}' is not valid Unicode: a lone surrogate {node[i]!r} at character {i}; "
                          "send text that encodes to UTF-8 (a surrogate pair, or the character itself)", path or None)
        elif isinstance(node, dict):
            for k in node:
                if _surrogate(k) is not None:
                    raise bad(f"a key of '{path or 'body'}' is not valid Unicode (a lone surrogate): "
                              "send keys that encode to UTF-8", path or None)
            stack.extend((v, f"{path}.{k}" if path else k) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((node[j], f"{path}[{j}]") for j in range(len(node) - 1, -1, -1))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> Optional[float]:
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v):
        raise bad(f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise bad(f"'{name}' must be in {left}{lo}, {hi}], got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int = 2**31 - 1) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def _image_tokens(body: dict) -> Any:
    """The r4b-edge extension `image_tokens`: N (positions an image may take), "auto" or "full";
    absent or null: the server's default (--image-tokens)."""
    from r4b_edge.errors import ImageTokensError
    from r4b_edge.model.image_budget import check_image_tokens

    v = body.get("image_tokens")
    if v is None:
        return None
    try:
        check_image_tokens(v)
    except ImageTokensError:
        raise bad(f"'image_tokens' must be a whole number >= 1 (positions an image may take), \"auto\" or \"full\" "
                  f"(or absent: the server's default), got {v!r}", "image_tokens") from None
    return v.strip().lower() if isinstance(v, str) else v


def _mode(body: dict) -> str:
    effort = body.get("reasoning_effort")
    kwargs = body.get("chat_template_kwargs")
    mode_effort = mode_kwargs = None
    if effort is not None:
        if not isinstance(effort, str) or effort not in EFFORT_MODES:
            raise bad(f"'reasoning_effort' must be one of {', '.join(EFFORT_MODES)}, got {effort!r}",
                      "reasoning_effort")
        mode_effort = EFFORT_MODES[effort]
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
        tm = kwargs.get("thinking_mode")
        if tm is not None:
            if not isinstance(tm, str) or tm not in THINKING_MODES:
                raise bad(f"'chat_template_kwargs.thinking_mode' must be one of auto, long, short, got {tm!r}",
                          "chat_template_kwargs.thinking_mode")
            mode_kwargs = THINKING_MODES[tm]
        elif kwargs.get("enable_thinking") is not None:  # Qwen3-style switch
            et = kwargs["enable_thinking"]
            if not isinstance(et, bool):
                raise bad("'chat_template_kwargs.enable_thinking' must be a boolean",
                          "chat_template_kwargs.enable_thinking", "invalid_type")
            mode_kwargs = "think" if et else "no-think"
    if mode_effort and mode_kwargs and mode_effort != mode_kwargs:
        raise bad(f"'reasoning_effort' ({effort!r} -> {mode_effort}) contradicts "
                  f"'chat_template_kwargs' ({mode_kwargs}): send one of them", "reasoning_effort")
    return mode_kwargs or mode_effort or "auto"


#: Sampling fields this server does not implement, with the value that changes nothing.
#: A neutral value is accepted (clients send defaults); any other is refused, never ignored.
NEUTRAL_FIELDS = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {},
                  "min_p": 0}


def _refuse_unimplemented(body: dict) -> None:
    for name, neutral in NEUTRAL_FIELDS.items():
        v = body.get(name)
        if v is not None and v != neutral:
            raise bad(f"'{name}' is not implemented by this server (only {neutral!r} or no value is accepted, "
                      f"got {v!r}): sampling uses temperature, top_p, top_k and seed", name,
                      "unsupported_parameter")


def _options(body: dict, limits: Limits) -> dict[str, Any]:
    opts: dict[str, Any] = {"mode": _mode(body)}
    max_tokens = _integer(body, "max_completion_tokens", 1)
    mt = _integer(body, "max_tokens", 1)
    opts["max_tokens"] = max_tokens or mt or limits.default_max_tokens
    opts["max_think_tokens"] = _integer(body, "max_thinking_tokens", 0)
    t = _number(body, "temperature", 0.0, 2.0)
    opts["temperature"] = 0.0 if t is None else t
    p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    opts["top_p"] = 1.0 if p is None else p
    k = _integer(body, "top_k", -1)
    opts["top_k"] = 0 if k is None or k < 0 else k  # vLLM: -1 = off
    opts["seed"] = _integer(body, "seed", 0, 2**63 - 1)
    opts["think_threshold"] = _number(body, "think_threshold", 0.0, 1.0)
    opts["deadline_ms"] = _number(body, "max_completion_time_ms", 0.0, 3.6e6, lo_open=True)
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad(f"'n' must be 1: one model instance answers one choice per request, got {n}", "n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    opts.update(parse_stop_logprobs(body, bad))
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("'response_format' other than {\"type\": \"text\"} is not supported", "response_format",
                  "unsupported_parameter")
    return opts


# ---- images ------------------------------------------------------------------------------------
def decode_data_uri(url: Any, param: str) -> bytes:
    """The bytes of a `data:[mime][;base64],...` URI; every other scheme is refused."""
    if not isinstance(url, str) or not url:
        raise bad("image_url.url must be a non-empty string", param, "invalid_type")
    low = url[:16].lower()
    if low.startswith(("http://", "https://")):
        raise bad("image URLs are not fetched by this server: send the image inline as a data URI "
                  "(data:image/png;base64,...)", param, "unsupported_image_url")
    if not low.startswith("data:"):
        raise bad("image_url.url must be a data URI (data:image/png;base64,...); local files and other "
                  "URL schemes are never read", param, "unsupported_image_url")
    head, sep, payload = url.partition(",")
    if not sep:
        raise bad("malformed data URI: no ',' before the image data", param)
    meta = head[5:].split(";")
    if meta[0] and not meta[0].lower().startswith("image/"):
        raise bad(f"data URI media type must be image/*, got {meta[0]!r}", param)
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise bad("data URI must be base64-encoded (data:image/png;base64,...)", param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad("data URI holds invalid base64", param) from None
    if not data:
        raise bad("data URI holds no image data", param)
    return data


def check_image(data: bytes, param: str, limits: Limits):
    """Decode one image (bytes only, never a path; PNG/JPEG/WebP/GIF/BMP only) under the
    pixel limit -> RGB PIL image. The size is read from the header before anything is decoded."""
    from r4b_edge.errors import ImageError, ImageTooLargeError
    from r4b_edge.model.processing import load_image

    try:
        return load_image(bytes(data), max_pixels=limits.max_image_pixels)
    except ImageTooLargeError as e:
        size = f"{e.pixels} pixels" if e.pixels else "too many pixels"
        raise bad(f"image is {size}, over this server's limit of {limits.max_image_pixels} pixels: send a "
                  "smaller image (or start the server with a larger --max-image-pixels)",
                  param, "image_too_large") from None
    except ImageError as e:
        raise bad(f"invalid image: {e}", param, "invalid_image") from None


# ---- messages ----------------------------------------------------------------------------------
def _text_of(content: Any, param: str, role: str) -> tuple[str, list[tuple[Any, str]]]:
    """Text and (image url, param) list of one message's content."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad("message content must be a string or a list of content parts", param, "invalid_type")
    texts: list[str] = []
    images: list[tuple[Any, str]] = []
    for j, part in enumerate(content):
        pp = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad("each content part must be an object with a 'type'", pp, "invalid_type")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad("a text part needs a string 'text'", f"{pp}.text", "invalid_type")
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            images.append((url, f"{pp}.image_url.url"))
        elif kind == "image_url":
            raise bad(f"an image_url part is not allowed in a {role} message: images go in a user message",
                      f"{pp}.type")
        else:
            raise bad(f"content part type {kind!r} is not supported by this server", f"{pp}.type")
    return "".join(texts), images


def _messages(body: dict, limits: Limits) -> tuple[list[Message], list[bytes], list[str]]:
    raw = body.get("messages")
    if raw is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
    if len(raw) > limits.max_messages:
        raise bad(f"too many messages ({len(raw)} > {limits.max_messages})", "messages")
    out: list[Message] = []
    images: list[bytes] = []
    params: list[str] = []
    for i, m in enumerate(raw):
        pm = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad("each message must be an object", pm, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"unsupported role {role!r}: use system, developer, user or assistant", f"{pm}.role")
        content = m.get("content")
        if role == "assistant" and m.get("tool_calls"):
            raise bad("tool calls are not supported by this server", f"{pm}.tool_calls", "unsupported_parameter")
        if content is None and role == "assistant":
            content = ""
        if content is None:
            raise bad("message content is required", f"{pm}.content", "missing_required_parameter")
        text, urls = _text_of(content, f"{pm}.content", role)
        if urls:
            if images:
                raise bad("only one user turn may carry images (the first one that has them): "
                          "start a new conversation for another image", urls[0][1])
            if len(urls) > limits.max_images:
                raise bad(f"too many images ({len(urls)} > {limits.max_images})", f"{pm}.content")
            for url, pp in urls:
                images.append(decode_data_uri(url, pp))
                params.append(pp)
        if role == "assistant":
            out.append(Message("assistant", history_answer(text)))  # a client's reasoning block is dropped
        elif role == "user":
            out.append(Message("user", text, images=len(urls)))
        else:
            out.append(Message("system", text))
    if out[-1].role != "user":
        raise bad("the last message must be a user message", f"messages[{len(raw) - 1}].role")
    return out, images, params


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Check a decoded JSON body; raises APIError(400) naming the offending field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    check_unicode(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream", "invalid_type")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(so and so.get("include_usage"))
    _refuse_unimplemented(body)
    options = _options(body, limits)
    image_tokens = _image_tokens(body)
    messages, images, params = _messages(body, limits)
    return ChatRequest(messages, images, params, options, stream, include_usage, model, image_tokens=image_tokens)


# ---- text bound --------------------------------------------------------------------------------
#: Characters tokenized per call while bounding a prompt (each call holds the GIL; ~10-40 ms).
TEXT_PIECE = 16_384


def check_text_fits(encode: Any, messages: list[Message], n_ctx: int, piece: int = TEXT_PIECE) -> int:
    """Count the messages' text tokens piece by piece and stop as soon as they cannot fit
    `n_ctx`, so a 19 MB prompt costs a few pieces, not a 46 s tokenizer call. Pieces end at
    whitespace (where the pre-tokenizer splits anyway), so the count is the whole text's
    count give or take a token per piece; the engine counts exactly later. Returns the count;
    raises APIError(400, context_length_exceeded) when over."""
    total, cuts = 0, 0
    for m in messages:
        text, i = m.content, 0
        while i < len(text):
            j = min(len(text), i + piece)
            if j < len(text):
                k = max(text.rfind(" ", i + piece // 2, j), text.rfind("\n", i + piece // 2, j))
                j, cuts = (k if k > i else j), cuts + 1
            total += len(encode(text[i:j]))
            if total > n_ctx + cuts:
                raise APIError(400, f"the messages hold more than {n_ctx} text tokens (counted {total} before "
                                    f"stopping) but the model's context is {n_ctx} tokens: shorten the "
                                    "conversation", "messages", "context_length_exceeded")
            i = j
    return total
