//! Stop sequences matched incrementally: each stop is a Knuth-Morris-Pratt automaton fed only
//! the new text, so a token costs O(new bytes x stops) whatever the stops' length, and the
//! text held back (a possible start of a stop) is never longer than the longest stop.

use std::sync::Arc;

/// One stop sequence with its KMP failure table.
#[derive(Debug)]
struct Stop {
    bytes: Vec<u8>,
    /// `fail[i]`: length of the longest proper prefix of `bytes[..=i]` that is also its suffix.
    fail: Vec<usize>,
}

impl Stop {
    fn new(s: &str) -> Self {
        let bytes = s.as_bytes().to_vec();
        let mut fail = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fail[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self { bytes, fail }
    }

    /// The matched length after `b`, from `state` (bytes of this stop matched so far).
    fn step(&self, mut state: usize, b: u8) -> usize {
        if state == self.bytes.len() {
            state = self.fail[state - 1];
        }
        while state > 0 && self.bytes[state] != b {
            state = self.fail[state - 1];
        }
        if self.bytes[state] == b {
            state += 1;
        }
        state
    }
}

/// The stop sequences of one request, compiled once and shared by its sequences.
#[derive(Debug, Default)]
pub struct StopSet {
    stops: Vec<Stop>,
}

impl StopSet {
    /// `stops` must be non-empty strings (validation refuses empty ones).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| Stop::new(s))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.stops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }
}

/// One sequence's progress through its request's stops.
#[derive(Debug)]
pub struct StopMatcher {
    set: Arc<StopSet>,
    /// Per stop: bytes of it matched at the end of the text so far.
    state: Vec<usize>,
    /// Text not yet emitted: it may be the start of a stop.
    held: String,
}

impl StopMatcher {
    pub fn new(set: Arc<StopSet>) -> Self {
        Self {
            state: vec![0; set.len()],
            set,
            held: String::new(),
        }
    }

    /// Appends `delta`; returns the text safe to send and whether a stop completed (the stop
    /// and whatever follows it are dropped; the first stop to complete wins).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.set.is_empty() {
            return (delta.to_string(), false);
        }
        let base = self.held.len();
        for (j, &b) in delta.as_bytes().iter().enumerate() {
            for (stop, state) in self.set.stops.iter().zip(&mut self.state) {
                *state = stop.step(*state, b);
                if *state == stop.bytes.len() {
                    // The match began inside the held text or in `delta`: both are here.
                    let start = base + j + 1 - stop.bytes.len();
                    self.held.push_str(delta);
                    let emit = self.held[..start].to_string();
                    self.held.clear();
                    self.state.iter_mut().for_each(|s| *s = 0);
                    return (emit, true);
                }
            }
        }
        self.held.push_str(delta);
        // Hold back the longest partial match. It starts at a character boundary: its bytes
        // equal a stop's prefix, which begins with a whole character, and the text is valid.
        let hold = self.state.iter().copied().max().unwrap_or(0);
        let cut = self.held.len() - hold;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        (emit, false)
    }

    /// The held text, final once the sequence ends without completing a stop.
    pub fn take_held(&mut self) -> String {
        self.state.iter_mut().for_each(|s| *s = 0);
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        StopMatcher::new(Arc::new(StopSet::new(&stops)))
    }

    /// Feeds `pieces` one by one; returns all emitted text and whether a stop hit.
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            let (emit, hit) = m.push(p);
            out.push_str(&emit);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.take_held());
        (out, false)
    }

    #[test]
    fn stops_split_across_pieces_are_found_and_cut() {
        let mut m = matcher(&["\n\n", "END"]);
        assert_eq!(
            run(&mut m, &["Hello", " wor", "ld\n", "\nmore"]),
            ("Hello world".into(), true)
        );
        let mut m = matcher(&["END"]);
        assert_eq!(run(&mut m, &["xE", "N", "D!"]), ("x".into(), true));
    }

    #[test]
    fn partial_matches_are_held_then_released() {
        let mut m = matcher(&["abc"]);
        assert_eq!(m.push("xxab"), ("xx".into(), false));
        assert_eq!(m.push("d"), ("abd".into(), false));
        assert_eq!(m.push("ab"), ("".into(), false));
        assert_eq!(m.take_held(), "ab");
    }

    #[test]
    fn overlapping_prefixes_use_the_failure_table() {
        // "aab" inside "aaab": a naive restart after "aa" + "a" would miss it
        let mut m = matcher(&["aab"]);
        assert_eq!(run(&mut m, &["a", "a", "a", "b", "c"]), ("a".into(), true));
        let mut m = matcher(&["abab"]);
        assert_eq!(run(&mut m, &["ababab"]), ("".into(), true));
        let mut m = matcher(&["abab"]);
        assert_eq!(run(&mut m, &["xabaabab"]), ("xaba".into(), true));
    }

    #[test]
    fn the_first_stop_to_complete_wins() {
        let mut m = matcher(&["abcd", "c"]);
        assert_eq!(run(&mut m, &["ab", "cd"]), ("ab".into(), true));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        let mut m = matcher(&["é!"]);
        assert_eq!(m.push("caf"), ("caf".into(), false));
        assert_eq!(m.push("é"), ("".into(), false));
        assert_eq!(m.push("?"), ("é?".into(), false));
        let mut m = matcher(&["€"]);
        // U+0082 ends in the same byte as the first two of "€" but is not its prefix
        assert_eq!(m.push("\u{82}"), ("\u{82}".into(), false));
    }

    #[test]
    fn held_text_never_exceeds_the_longest_stop() {
        let long = format!("{}y", "z".repeat(299));
        let mut m = matcher(&[&long, "q"]);
        for _ in 0..1000 {
            m.push("zz");
            assert!(m.held.len() < 300);
        }
    }

    #[test]
    fn no_stops_pass_text_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("anything"), ("anything".into(), false));
        assert_eq!(m.take_held(), "");
    }
}
