"""Drives whittle serve with the official OpenAI client (changed only by base_url) and parses /metrics with
prometheus_client's text parser. Usage: openai_client.py ENCODER_URL DECODER_URL"""

import sys
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

enc_url, dec_url = sys.argv[1], sys.argv[2]

enc = openai.OpenAI(base_url=enc_url + "/v1", api_key="unused")
emb = enc.embeddings.create(model="tiny", input=["w3 w4 w5", "w6"])  # the client asks for base64
assert len(emb.data) == 2, emb
assert len(emb.data[0].embedding) == 16, len(emb.data[0].embedding)
assert abs(sum(x * x for x in emb.data[0].embedding) - 1.0) < 1e-4, "L2-normalised"
assert emb.usage.prompt_tokens == 5 + 3, emb.usage
floats = enc.embeddings.create(model="tiny", input="w3 w4 w5", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, emb.data[0].embedding)) < 1e-6

dec = openai.OpenAI(base_url=dec_url + "/v1", api_key="unused")
c = dec.completions.create(model="tiny", prompt="w3 w4", max_tokens=5, temperature=0,
                           extra_body={"ignore_eos": True})
assert c.choices[0].finish_reason == "length", c
assert c.usage.completion_tokens == 5, c.usage
assert c.choices[0].text.strip(), c

pieces, finish, usage = [], None, None
stream = dec.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w3 w4"}],
                                     max_tokens=6, temperature=0, stream=True,
                                     stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
assert pieces and finish == "length" and usage.completion_tokens == 6, (pieces, finish, usage)
whole = dec.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w3 w4"}],
                                    max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
assert whole.choices[0].message.content == "".join(pieces), (whole, pieces)

try:
    dec.completions.create(model="no-such-model", prompt="w3", max_tokens=1)
    raise SystemExit("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body

# /metrics parses, and its counters match what this script sent.
text = urllib.request.urlopen(dec_url + "/metrics").read().decode()
families = {f.name: f for f in text_string_to_metric_families(text)}
req = families["whittle_requests"]
count = {(s.labels["route"], s.labels["status"]): s.value for s in req.samples if s.name == "whittle_requests_total"}
assert count[("/v1/completions", "200")] == 1, count
assert count[("/v1/chat/completions", "200")] == 2, count
assert count[("/v1/completions", "404")] == 1, count
assert "whittle_time_to_first_token_seconds" in families and "process_resident_memory_bytes" in families
enc_text = urllib.request.urlopen(enc_url + "/metrics").read().decode()
enc_req = {s.labels["route"]: s.value for f in text_string_to_metric_families(enc_text) if f.name == "whittle_requests"
           for s in f.samples if s.name == "whittle_requests_total" and s.labels["status"] == "200"}
assert enc_req["/v1/embeddings"] == 2, enc_req
print("ok")
