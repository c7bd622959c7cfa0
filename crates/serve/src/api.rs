//! The OpenAI-shaped request bodies and how their flexible fields are read.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Reads a JSON body: not JSON → 400; JSON of the wrong shape → 422 naming the field.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))?;
    typed(&v)
}

/// A request that also carries the decoding fields: its own part and [`GenParams`], each read from the
/// same JSON object (not `#[serde(flatten)]`, which would lose the name of a field of the wrong type).
pub fn parse_gen<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, GenParams), ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("the body is not valid JSON: {e}")))?;
    Ok((typed(&v)?, typed(&v)?))
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::wrong_type(format!("the body does not match this endpoint: {inner}"), None)
        } else {
            ApiError::wrong_type(format!("field `{path}`: {inner}"), Some(&path))
        }
    })
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub input: Value,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// `POST /v1/similarity`: text-embeddings-inference's `/similarity` request, `{"inputs": {"source_sentence",
/// "sentences"}}`, with OpenAI's optional `model`.
#[derive(Debug, Deserialize)]
pub struct SimilarityRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub inputs: SimilarityInputs,
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct SimilarityInputs {
    pub source_sentence: String,
    pub sentences: Vec<String>,
}

/// A text or a list of token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// OpenAI's `input` / `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
pub fn inputs(v: &Value, param: &str) -> Result<Vec<Input>, ApiError> {
    let wrong = || {
        ApiError::wrong_type(
            format!(
                "`{param}` must be a string, a list of strings, a list of token ids or a list of lists of token ids"
            ),
            Some(param),
        )
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter().map(|x| x.as_u64().filter(|&i| i <= u32::MAX as u64).map(|i| i as u32).ok_or_else(wrong)).collect()
    };
    let out = match v {
        Value::String(s) => vec![Input::Text(s.clone())],
        Value::Array(a) if a.is_empty() => return Err(ApiError::invalid(format!("`{param}` is empty"), param)),
        Value::Array(a) if a.iter().all(|x| x.is_string()) => {
            a.iter().map(|x| Input::Text(x.as_str().unwrap_or_default().to_string())).collect()
        }
        Value::Array(a) if a.iter().all(|x| x.is_number()) => vec![Input::Ids(ids(a)?)],
        Value::Array(a) if a.iter().all(|x| x.is_array()) => a
            .iter()
            .map(|x| Ok(Input::Ids(ids(x.as_array().map(|v| v.as_slice()).unwrap_or(&[]))?)))
            .collect::<Result<_, _>>()?,
        _ => return Err(wrong()),
    };
    Ok(out)
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The decoding fields completions and chat completions share.
#[derive(Debug, Default, Deserialize)]
pub struct GenParams {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub best_of: Option<u64>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
}

/// A chat message's text: a string, or a list of `{"type": "text", "text": …}` parts.
pub fn message_text(v: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                (ty, _) => Err(ApiError::invalid(
                    format!("`{param}`: only text parts are supported, not {}", ty.unwrap_or("(untyped)")),
                    &param,
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.concat()),
        _ => Err(ApiError::wrong_type(format!("`{param}` must be a string or a list of text parts"), Some(&param))),
    }
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessageIn>>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_input_shape() {
        assert_eq!(inputs(&json!("a"), "input").unwrap(), vec![Input::Text("a".into())]);
        assert_eq!(inputs(&json!(["a", "b"]), "input").unwrap().len(), 2);
        assert_eq!(inputs(&json!([1, 2, 3]), "input").unwrap(), vec![Input::Ids(vec![1, 2, 3])]);
        assert_eq!(inputs(&json!([[1], [2, 3]]), "input").unwrap().len(), 2);
        for bad in [json!(3), json!(["a", 1]), json!([-1]), json!([[1], "a"]), json!({"a": 1}), json!(null)] {
            let e = inputs(&bad, "input").unwrap_err();
            assert_eq!(e.status.as_u16(), 422, "{bad}");
        }
        assert_eq!(inputs(&json!([]), "input").unwrap_err().status.as_u16(), 400);
    }

    #[test]
    fn bad_bodies_are_400_or_422_with_the_field() {
        let e = parse_gen::<CompletionRequest>(b"{\"prompt\": ").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = parse_gen::<CompletionRequest>(br#"{"prompt": "x", "max_tokens": "many"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse_gen::<ChatRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        let e = parse_gen::<ChatRequest>(br#"{"messages": [{"role": 3}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let (_, p) = parse_gen::<CompletionRequest>(br#"{"prompt": "x", "stop": ["a", "b"], "stream": true}"#).unwrap();
        assert!(matches!(p.stop, Some(Stop::Many(ref v)) if v.len() == 2));
    }
}
