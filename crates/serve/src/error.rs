//! Every failure a client can see, as an HTTP status and OpenAI's error envelope
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`, …
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (`Retry-After`), for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400: the request is well-formed JSON but asks for something invalid.
    pub fn invalid(message: impl Into<String>, param: &str) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.into());
        e
    }

    /// 400: the body is not JSON.
    pub fn malformed(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.code = Some("invalid_json");
        e
    }

    /// 422: JSON of the wrong shape (a field of the wrong type, a missing field).
    pub fn wrong_type(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", message);
        e.param = param.map(String::from);
        e
    }

    /// 400: a prompt or input longer than the model's context.
    pub fn too_long(message: impl Into<String>, param: &str) -> Self {
        let mut e = Self::invalid(message, param);
        e.code = Some("context_length_exceeded");
        e
    }

    pub fn unauthorized() -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", "invalid or missing API key");
        e.code = Some("invalid_api_key");
        e
    }

    pub fn model_not_found(asked: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("the model `{asked}` does not exist; this server serves `{served}`"),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "not_found_error", format!("no route {method} {path}"));
        e.code = Some("unknown_route");
        e
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", format!("{path} does not take {method}"))
    }

    /// 404 for an endpoint of the other model kind (`/v1/embeddings` on a decoder).
    pub fn wrong_kind(route: &str, kind: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("{route} is not served for this model: it is {kind}"),
        );
        e.code = Some("unsupported_endpoint");
        e
    }

    pub fn body_too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than the limit of {limit} bytes"),
        );
        e.code = Some("request_too_large");
        e
    }

    pub fn queue_full(depth: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("the server is busy: {depth} requests are already waiting; retry later"),
        );
        e.code = Some("queue_full");
        e.retry_after = Some(1);
        e
    }

    pub fn timeout(secs: f64) -> Self {
        let mut e = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("the request did not finish within the request timeout of {secs} s"),
        );
        e.code = Some("request_timeout");
        e
    }

    pub fn loading() -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "the model is still loading");
        e.code = Some("model_loading");
        e.retry_after = Some(1);
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The envelope as JSON (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_every_field() {
        let b = ApiError::invalid("bad n", "n").body();
        let e = &b["error"];
        assert_eq!(e["message"], "bad n");
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], "n");
        assert!(e.get("code").is_some(), "code is present (null when none)");
        let r = ApiError::queue_full(3).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
