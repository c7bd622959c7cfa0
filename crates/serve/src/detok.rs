//! Token ids to streamed text: whole characters only, and never text that may turn out to start a stop
//! string.

use whittle_models::{text, Loaded};

/// Decodes a growing sequence and hands out the text that is safe to send.
pub struct Detok<'a> {
    l: &'a Loaded,
    ids: Vec<u32>,
    stops: &'a [String],
    /// Bytes of the decoded text already handed out.
    sent: usize,
    text: String,
}

impl<'a> Detok<'a> {
    pub fn new(l: &'a Loaded, stops: &'a [String]) -> Self {
        Self { l, ids: Vec::new(), stops, sent: 0, text: String::new() }
    }

    /// Adds a token; returns the new text that can be sent and whether a stop string was reached (the
    /// text then ends before it).
    pub fn push(&mut self, tok: u32) -> (String, bool) {
        self.ids.push(tok);
        // Decoding the whole sequence keeps multi-byte characters and leading-space rules right.
        let Ok(t) = text::decode(self.l, &self.ids) else { return (String::new(), false) };
        if t.len() < self.sent || !t.is_char_boundary(self.sent) || t[..self.sent] != self.text[..self.sent] {
            // The decoder rewrote text already sent (rare): keep what was sent, continue after it.
            self.text = format!("{}{}", &self.text[..self.sent], t.get(self.sent..).unwrap_or(""));
        } else {
            self.text = t;
        }
        let search_from = self.sent.saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = (0..=search_from).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|p| p + search_from))
            .min();
        if let Some(p) = hit {
            self.text.truncate(p);
            let delta = self.text.get(self.sent..).unwrap_or("").to_string();
            self.sent = self.text.len().max(self.sent);
            return (delta, true);
        }
        // Hold back an incomplete character and any tail that could begin a stop string.
        let mut end = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k))
                    .find(|&k| self.text[..end].ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let mut safe = end - hold;
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe <= self.sent {
            return (String::new(), false);
        }
        let delta = self.text[self.sent..safe].to_string();
        self.sent = safe;
        (delta, false)
    }

    /// The text held back so far (at the end of a sequence without a stop string).
    pub fn flush(&mut self) -> String {
        let rest = self.text.get(self.sent..).unwrap_or("").to_string();
        self.sent = self.text.len();
        rest
    }

    /// Everything decoded (up to a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}
