//! permessage-deflate negotiation (RFC 7692 §5, §7.1): parses every offer in the
//! `Sec-WebSocket-Extensions` header values and answers the first acceptable one.
//!
//! Owns the header grammar (RFC 6455 §9.1 with the RFC 7230 §7 list and quoted-string rules)
//! and the choice of agreed parameters. It never fails a handshake: an offer it cannot accept,
//! for whatever reason, is declined and the next one is tried. It allocates only the answer.

use super::{DeflateConfig, DeflateParams};

/// The registered extension token (RFC 7692 §7).
const EXTENSION: &[u8] = b"permessage-deflate";

/// The largest LZ77 window, 2^15 bytes, the default when no window bits are agreed.
pub(crate) const MAX_WINDOW_BITS: u8 = 15;

/// The smallest window an offer may name (RFC 7692 §7.1.2.1, §7.1.2.2).
const MIN_WINDOW_BITS: u8 = 8;

/// Picks the first acceptable offer among the `Sec-WebSocket-Extensions` header values and
/// returns the agreed parameters and the response header value, or `None` to decline.
///
/// Every value may hold several comma-separated offers, and several header lines may be given;
/// their order is the client's preference (RFC 7692 §5). Offers of other extensions are skipped.
/// A `permessage-deflate` offer with an unknown or repeated parameter, or a value that is
/// missing, superfluous, malformed or out of range, is declined (RFC 7692 §7, §7.1) and the
/// next offer is tried; so is an element that breaks the header grammar.
///
/// The answer follows the server policy in `config`: by default it carries
/// `server_no_context_takeover` (allowed unsolicited, §7.1.1.1) and `client_no_context_takeover`
/// (§7.1.1.2), so that both sides compress each message on its own.
pub fn negotiate<'a>(
    offers: impl IntoIterator<Item = &'a [u8]>,
    config: &DeflateConfig,
) -> Option<(DeflateParams, String)> {
    if !config.enabled {
        return None;
    }
    for value in offers {
        let mut parser = Parser {
            input: value,
            pos: 0,
        };
        while let Some(element) = parser.next_element() {
            let Ok(Some(offer)) = element else { continue };
            if let Some(answer) = accept(&offer, config) {
                return Some(answer);
            }
        }
    }
    None
}

/// One syntactically valid `permessage-deflate` offer with valid parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    /// `server_max_window_bits=N` (a value is required, §7.1.2.1).
    server_max_window_bits: Option<u8>,
    /// `client_max_window_bits` with its optional value (§7.1.2.2).
    client_max_window_bits: Option<Option<u8>>,
}

/// Computes the agreed parameters and the answer for one valid offer, or `None` if the
/// server policy cannot accept it.
fn accept(offer: &Offer, config: &DeflateConfig) -> Option<(DeflateParams, String)> {
    let server_cap = config
        .server_max_window_bits
        .clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
    let client_cap = config
        .client_max_window_bits
        .clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);

    // §7.1.2.1: an offered server_max_window_bits is accepted by answering the same or a
    // smaller value; without one, the server MAY still name its own limit.
    let server_max_window_bits = match offer.server_max_window_bits {
        Some(bits) => Some(bits.min(server_cap)),
        None if server_cap < MAX_WINDOW_BITS => Some(server_cap),
        None => None,
    };
    let server_bits = server_max_window_bits.unwrap_or(MAX_WINDOW_BITS);

    // §7.1.1.1: a requested server_no_context_takeover must be echoed, and the server may add
    // it unsolicited. A takeover compressor needs zlib, which cannot deflate with a 256-byte
    // window, so window 8 always means per-message compression.
    let server_no_context_takeover =
        offer.server_no_context_takeover || !config.server_context_takeover || server_bits < 9;

    // §7.1.2.2: client_max_window_bits may be answered (with a value) only if it was offered.
    // Only a takeover inflater keeps a window, so only then does a limit save memory; if the
    // client cannot be limited, it is asked not to take over its context instead (§7.1.1.2).
    let mut client_no_context_takeover =
        offer.client_no_context_takeover || !config.client_context_takeover;
    let mut client_max_window_bits = None;
    if !client_no_context_takeover && client_cap < MAX_WINDOW_BITS {
        match offer.client_max_window_bits {
            Some(value) => {
                client_max_window_bits = Some(value.unwrap_or(MAX_WINDOW_BITS).min(client_cap));
            }
            None => client_no_context_takeover = true,
        }
    }

    let params = DeflateParams {
        server_no_context_takeover,
        client_no_context_takeover,
        server_max_window_bits: server_bits,
        client_max_window_bits: client_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
    };
    let mut answer = String::with_capacity(128);
    answer.push_str("permessage-deflate");
    if server_no_context_takeover {
        answer.push_str("; server_no_context_takeover");
    }
    if client_no_context_takeover {
        answer.push_str("; client_no_context_takeover");
    }
    if let Some(bits) = server_max_window_bits {
        answer.push_str("; server_max_window_bits=");
        answer.push_str(&bits.to_string());
    }
    if let Some(bits) = client_max_window_bits {
        answer.push_str("; client_max_window_bits=");
        answer.push_str(&bits.to_string());
    }
    Some((params, answer))
}

/// Why a list element was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decline {
    /// The element breaks the RFC 6455 §9.1 grammar.
    Syntax,
    /// A `permessage-deflate` offer whose parameters RFC 7692 §7 says to decline.
    Parameters,
}

/// A parameter value: absent, or the unescaped value if it is short enough to matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// `name` alone.
    Absent,
    /// `name=value`; only values of up to [`Value::CAP`] bytes are kept, longer ones are
    /// marked `Long` (no valid permessage-deflate value is that long).
    Short([u8; Value::CAP], u8),
    /// A value longer than [`Value::CAP`] bytes.
    Long,
}

impl Value {
    const CAP: usize = 4;

    /// The window bits this value names: a decimal integer 8..=15 without leading zeros
    /// (RFC 7692 §7.1.2.1, §7.1.2.2).
    fn window_bits(&self) -> Option<u8> {
        match self {
            Value::Short(bytes, len) => match &bytes[..usize::from(*len)] {
                [digit @ b'8'..=b'9'] => Some(digit - b'0'),
                [b'1', digit @ b'0'..=b'5'] => Some(10 + digit - b'0'),
                _ => None,
            },
            Value::Absent | Value::Long => None,
        }
    }
}

/// A cursor over one header value. Grammar (RFC 6455 §9.1, RFC 7230 §3.2.6 and §7):
///
/// ```text
/// extension-list = 1#extension        ; empty elements and OWS around commas are allowed
/// extension      = token *( OWS ";" OWS extension-param )
/// extension-param = token [ OWS "=" OWS ( token / quoted-string ) ]
/// ```
///
/// A quoted value must unescape to a token (RFC 6455 §9.1).
struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    /// The next list element: `Ok(Some(offer))` for a valid permessage-deflate offer,
    /// `Ok(None)` for another extension, `Err` for one to decline; `None` at the end.
    fn next_element(&mut self) -> Option<Result<Option<Offer>, Decline>> {
        loop {
            self.skip_ows();
            match self.peek() {
                None => return None,
                // RFC 7230 §7: empty list elements are accepted and ignored.
                Some(b',') => self.pos += 1,
                Some(_) => break,
            }
        }
        let result = self.element();
        // A declined offer was parsed through its comma; a syntax error stops mid-element.
        if result == Err(Decline::Syntax) {
            self.recover();
        }
        Some(result)
    }

    /// Parses one element up to and including its closing comma (or the end).
    fn element(&mut self) -> Result<Option<Offer>, Decline> {
        let name = self.token().ok_or(Decline::Syntax)?;
        let ours = name.eq_ignore_ascii_case(EXTENSION);
        let mut offer = Offer::default();
        let mut valid = true;
        loop {
            self.skip_ows();
            match self.peek() {
                None => break,
                Some(b',') => {
                    self.pos += 1;
                    break;
                }
                Some(b';') => self.pos += 1,
                Some(_) => return Err(Decline::Syntax),
            }
            self.skip_ows();
            let param = self.token().ok_or(Decline::Syntax)?;
            self.skip_ows();
            let value = if self.peek() == Some(b'=') {
                self.pos += 1;
                self.skip_ows();
                self.value()?
            } else {
                Value::Absent
            };
            if ours && valid {
                valid = apply(&mut offer, param, value);
            }
        }
        match (ours, valid) {
            (false, _) => Ok(None),
            (true, true) => Ok(Some(offer)),
            (true, false) => Err(Decline::Parameters),
        }
    }

    /// A token or a quoted-string that unescapes to a token.
    fn value(&mut self) -> Result<Value, Decline> {
        let mut kept = [0u8; Value::CAP];
        let mut len = 0usize;
        let mut push = |byte: u8| {
            if len < Value::CAP {
                kept[len] = byte;
            }
            len += 1;
        };
        if self.peek() == Some(b'"') {
            self.pos += 1;
            let mut all_tchar = true;
            loop {
                let byte = self.peek().ok_or(Decline::Syntax)?;
                self.pos += 1;
                match byte {
                    b'"' => break,
                    b'\\' => {
                        let escaped = self.peek().ok_or(Decline::Syntax)?;
                        if !is_quoted_pair_char(escaped) {
                            return Err(Decline::Syntax);
                        }
                        self.pos += 1;
                        all_tchar &= is_tchar(escaped);
                        push(escaped);
                    }
                    _ if is_qdtext(byte) => {
                        all_tchar &= is_tchar(byte);
                        push(byte);
                    }
                    _ => return Err(Decline::Syntax),
                }
            }
            // RFC 6455 §9.1: the unescaped value MUST conform to the token ABNF.
            if !all_tchar || len == 0 {
                return Err(Decline::Syntax);
            }
        } else {
            let token = self.token().ok_or(Decline::Syntax)?;
            token.iter().for_each(|&byte| push(byte));
        }
        Ok(match u8::try_from(len) {
            Ok(short) if len <= Value::CAP => Value::Short(kept, short),
            _ => Value::Long,
        })
    }

    /// A non-empty run of tchar.
    fn token(&mut self) -> Option<&'a [u8]> {
        let (input, start) = (self.input, self.pos);
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        (self.pos > start).then(|| &input[start..self.pos])
    }

    /// After a syntax error, skips to just past the next comma outside a quoted-string.
    fn recover(&mut self) {
        let mut quoted = false;
        while let Some(byte) = self.peek() {
            self.pos += 1;
            match byte {
                b'\\' if quoted => self.pos += 1,
                b'"' => quoted = !quoted,
                b',' if !quoted => return,
                _ => {}
            }
        }
        self.pos = self.input.len();
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }
}

/// Records one parameter of a permessage-deflate offer; `false` if RFC 7692 §7 says to decline
/// the offer: an unknown parameter, a repeated one, or an invalid value.
fn apply(offer: &mut Offer, name: &[u8], value: Value) -> bool {
    let is = |expected: &str| name.eq_ignore_ascii_case(expected.as_bytes());
    if is("server_no_context_takeover") {
        // §7.1.1.1: this parameter has no value.
        let fresh = !offer.server_no_context_takeover && value == Value::Absent;
        offer.server_no_context_takeover = true;
        fresh
    } else if is("client_no_context_takeover") {
        // §7.1.1.2: this parameter has no value.
        let fresh = !offer.client_no_context_takeover && value == Value::Absent;
        offer.client_no_context_takeover = true;
        fresh
    } else if is("server_max_window_bits") {
        // §7.1.2.1: the value is required, 8..=15.
        let fresh = offer.server_max_window_bits.is_none();
        match value.window_bits() {
            Some(bits) if fresh => {
                offer.server_max_window_bits = Some(bits);
                true
            }
            _ => false,
        }
    } else if is("client_max_window_bits") {
        // §7.1.2.2: the value is optional, 8..=15 when present.
        if offer.client_max_window_bits.is_some() {
            return false;
        }
        match value {
            Value::Absent => {
                offer.client_max_window_bits = Some(None);
                true
            }
            _ => match value.window_bits() {
                Some(bits) => {
                    offer.client_max_window_bits = Some(Some(bits));
                    true
                }
                None => false,
            },
        }
    } else {
        false
    }
}

/// tchar (RFC 7230 §3.2.6).
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// qdtext (RFC 7230 §3.2.6): HTAB, SP, VCHAR except `"` and `\`, obs-text.
fn is_qdtext(byte: u8) -> bool {
    matches!(byte, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff)
}

/// The escaped byte of a quoted-pair (RFC 7230 §3.2.6): HTAB, SP, VCHAR, obs-text.
fn is_quoted_pair_char(byte: u8) -> bool {
    matches!(byte, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_answer(offers: &[&str]) -> Option<String> {
        let config = DeflateConfig::default();
        negotiate(offers.iter().map(|offer| offer.as_bytes()), &config).map(|(_, answer)| answer)
    }

    fn params_of(offers: &[&str], config: &DeflateConfig) -> Option<(DeflateParams, String)> {
        negotiate(offers.iter().map(|offer| offer.as_bytes()), config)
    }

    const NO_TAKEOVER: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn answers_each_autobahn_13_offer_shape_with_no_takeover_both_ways() {
        let table: &[(&str, Option<&str>)] = &[
            ("permessage-deflate", None),
            ("permessage-deflate; client_no_context_takeover", None),
            ("permessage-deflate; server_no_context_takeover", None),
            ("permessage-deflate; client_max_window_bits", None),
            ("permessage-deflate; client_max_window_bits=8", None),
            ("permessage-deflate; client_max_window_bits=15", None),
            (
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
                None,
            ),
            ("permessage-deflate; server_max_window_bits=9", Some("9")),
            ("permessage-deflate; server_max_window_bits=8", Some("8")),
            ("permessage-deflate; server_max_window_bits=15", Some("15")),
            (
                "permessage-deflate; client_max_window_bits; server_max_window_bits=10",
                Some("10"),
            ),
            (
                "permessage-deflate; client_no_context_takeover; server_max_window_bits=12; \
                 client_max_window_bits=9; server_no_context_takeover",
                Some("12"),
            ),
        ];
        for (offer, server_bits) in table {
            let expected = match server_bits {
                None => NO_TAKEOVER.to_owned(),
                Some(bits) => format!("{NO_TAKEOVER}; server_max_window_bits={bits}"),
            };
            assert_eq!(default_answer(&[offer]), Some(expected), "offer {offer:?}");
        }
    }

    #[test]
    fn accepts_every_client_max_window_bits_value_from_8_to_15() {
        for bits in 8..=15 {
            let offer = format!("permessage-deflate; client_max_window_bits={bits}");
            let (params, answer) = params_of(&[&offer], &DeflateConfig::default()).unwrap();
            // Whole-message inflation needs no limit, so §7.1.2.2's MAY is not used.
            assert_eq!(answer, NO_TAKEOVER, "offer {offer:?}");
            assert_eq!(params.client_max_window_bits, 15);
        }
    }

    #[test]
    fn agreed_params_follow_the_answer() {
        let (params, _) = params_of(
            &["permessage-deflate; server_max_window_bits=10"],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            params,
            DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 10,
                client_max_window_bits: 15,
            }
        );
    }

    #[test]
    fn answers_chrome_and_firefox_offers() {
        // Chrome, Firefox, Safari (WebKit) as they send them.
        assert_eq!(
            default_answer(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some(NO_TAKEOVER)
        );
        assert_eq!(
            default_answer(&["permessage-deflate"]).as_deref(),
            Some(NO_TAKEOVER)
        );
    }

    #[test]
    fn declines_malformed_parameters() {
        let bad = [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=1O",
            "permessage-deflate; server_max_window_bits=-9",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; server_max_window_bits=99999999999999999999",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover=true",
            "permessage-deflate; client_no_context_takeover=\"\"",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; client_max_window_bits=10; client_max_window_bits",
            "permessage-deflate; mux",
            "permessage-deflate; x-webkit-deflate-frame",
            "permessage-deflate;",
            "permessage-deflate; ; client_max_window_bits",
            "permessage-deflate client_max_window_bits",
            "permessage-deflate; client_max_window_bits=\"1 0\"",
            "permessage-deflate; client_max_window_bits=\"10",
            "permessage-deflate; =10",
            "permessage-deflate; server_max_window_bits==10",
            "permessage-deflate; server_max_window_bits=10 10",
        ];
        for offer in bad {
            assert_eq!(default_answer(&[offer]), None, "offer {offer:?}");
        }
    }

    #[test]
    fn declined_offer_falls_through_to_the_next_one() {
        let answer = default_answer(&[
            "permessage-deflate; server_max_window_bits=7, permessage-deflate; \
             server_max_window_bits=9, permessage-deflate",
        ]);
        assert_eq!(
            answer,
            Some(format!("{NO_TAKEOVER}; server_max_window_bits=9"))
        );

        let answer = default_answer(&[
            "permessage-deflate; unknown_param",
            "x-foo, permessage-deflate; server_max_window_bits=11",
        ]);
        assert_eq!(
            answer,
            Some(format!("{NO_TAKEOVER}; server_max_window_bits=11"))
        );
    }

    #[test]
    fn grammar_error_only_costs_its_own_element() {
        let answer = default_answer(&["permessage-deflate; client_max_window_bits=\"a,b\"; @@, \
             permessage-deflate; server_max_window_bits=12"]);
        assert_eq!(
            answer,
            Some(format!("{NO_TAKEOVER}; server_max_window_bits=12"))
        );
        let answer = default_answer(&["\"unterminated, permessage-deflate", "permessage-deflate"]);
        assert_eq!(answer.as_deref(), Some(NO_TAKEOVER));
    }

    #[test]
    fn skips_other_extensions_and_empty_elements() {
        assert_eq!(
            default_answer(&["x-webkit-deflate-frame", "foo; bar=\"baz\""]),
            None
        );
        assert_eq!(default_answer(&[]), None);
        assert_eq!(default_answer(&[""]), None);
        assert_eq!(
            default_answer(&[" , ,\tfoo;a=1 , , permessage-deflate ,"]).as_deref(),
            Some(NO_TAKEOVER)
        );
    }

    #[test]
    fn parses_quoted_values_and_whitespace() {
        let answer = default_answer(&[
            "permessage-deflate \t;\tserver_max_window_bits = \"10\" ; client_max_window_bits",
        ]);
        assert_eq!(
            answer,
            Some(format!("{NO_TAKEOVER}; server_max_window_bits=10"))
        );
        let answer = default_answer(&["permessage-deflate; server_max_window_bits=\"1\\3\""]);
        assert_eq!(
            answer,
            Some(format!("{NO_TAKEOVER}; server_max_window_bits=13"))
        );
        // Another extension's quoted value may hold commas and semicolons.
        let answer = default_answer(&[
            "foo; bar=\"a, b; c=\\\"d\\\"\", permessage-deflate; server_max_window_bits=14",
        ]);
        assert_eq!(
            answer,
            Some(format!("{NO_TAKEOVER}; server_max_window_bits=14"))
        );
    }

    #[test]
    fn extension_and_parameter_names_ignore_ascii_case() {
        let answer = default_answer(&["PerMessage-Deflate; Server_Max_Window_Bits=9"]);
        assert_eq!(
            answer,
            Some(format!("{NO_TAKEOVER}; server_max_window_bits=9"))
        );
    }

    #[test]
    fn disabled_config_declines_everything() {
        let config = DeflateConfig {
            enabled: false,
            ..DeflateConfig::default()
        };
        assert_eq!(params_of(&["permessage-deflate"], &config), None);
    }

    #[test]
    fn takeover_policy_keeps_context_unless_the_client_asks_otherwise() {
        let config = DeflateConfig {
            server_context_takeover: true,
            client_context_takeover: true,
            ..DeflateConfig::default()
        };
        let (params, answer) = params_of(&["permessage-deflate"], &config).unwrap();
        assert_eq!(answer, "permessage-deflate");
        assert!(!params.server_no_context_takeover && !params.client_no_context_takeover);

        // §7.1.1.1: a requested server_no_context_takeover MUST be echoed.
        let (params, answer) =
            params_of(&["permessage-deflate; server_no_context_takeover"], &config).unwrap();
        assert_eq!(answer, "permessage-deflate; server_no_context_takeover");
        assert!(params.server_no_context_takeover && !params.client_no_context_takeover);

        let (params, answer) =
            params_of(&["permessage-deflate; client_no_context_takeover"], &config).unwrap();
        assert_eq!(answer, "permessage-deflate; client_no_context_takeover");
        assert!(!params.server_no_context_takeover && params.client_no_context_takeover);

        // zlib cannot deflate with a 256-byte window: fall back to per-message compression.
        let (params, answer) =
            params_of(&["permessage-deflate; server_max_window_bits=8"], &config).unwrap();
        assert_eq!(
            answer,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=8"
        );
        assert_eq!(params.server_max_window_bits, 8);
    }

    #[test]
    fn window_policy_limits_takeover_memory_where_the_rfc_allows() {
        let config = DeflateConfig {
            server_context_takeover: true,
            client_context_takeover: true,
            server_max_window_bits: 10,
            client_max_window_bits: 11,
            ..DeflateConfig::default()
        };
        // §7.1.2.1: the server may name its window unsolicited; §7.1.2.2: the client's only
        // if offered, so without it the client is told not to take over instead.
        let (params, answer) = params_of(&["permessage-deflate"], &config).unwrap();
        assert_eq!(
            answer,
            "permessage-deflate; client_no_context_takeover; server_max_window_bits=10"
        );
        assert_eq!(
            (params.server_max_window_bits, params.client_max_window_bits),
            (10, 15)
        );

        let (params, answer) =
            params_of(&["permessage-deflate; client_max_window_bits"], &config).unwrap();
        assert_eq!(
            answer,
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=11"
        );
        assert_eq!(
            (params.server_max_window_bits, params.client_max_window_bits),
            (10, 11)
        );

        let (params, answer) = params_of(
            &["permessage-deflate; client_max_window_bits=9; server_max_window_bits=12"],
            &config,
        )
        .unwrap();
        assert_eq!(
            answer,
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9"
        );
        assert_eq!(
            (params.server_max_window_bits, params.client_max_window_bits),
            (10, 9)
        );
    }

    const PIECES: [&str; 20] = [
        "permessage-deflate",
        "x-foo",
        ";",
        ",",
        "=",
        " ",
        "\t",
        "\"",
        "\\",
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
        "8",
        "9",
        "10",
        "15",
        "16",
        "07",
        "@",
    ];

    proptest::proptest! {
        #[test]
        fn any_header_gets_a_valid_answer_or_none(
            headers in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(&PIECES[..]), 0..16),
                0..3,
            ),
        ) {
            let values: Vec<String> = headers.iter().map(|pieces| pieces.concat()).collect();
            let offers: Vec<&str> = values.iter().map(String::as_str).collect();
            if let Some((params, answer)) = params_of(&offers, &DeflateConfig::default()) {
                proptest::prop_assert!(answer.starts_with(NO_TAKEOVER), "{}", answer);
                proptest::prop_assert!((8..=15).contains(&params.server_max_window_bits));
                // The answer itself is a well-formed permessage-deflate element.
                let mut parser = Parser { input: answer.as_bytes(), pos: 0 };
                proptest::prop_assert!(matches!(parser.next_element(), Some(Ok(Some(_)))));
                proptest::prop_assert!(parser.next_element().is_none());
            }
        }
    }

    #[test]
    fn never_answers_client_max_window_bits_that_was_not_offered() {
        for server_takeover in [false, true] {
            for client_takeover in [false, true] {
                for bits in 8..=15 {
                    let config = DeflateConfig {
                        server_context_takeover: server_takeover,
                        client_context_takeover: client_takeover,
                        client_max_window_bits: bits,
                        server_max_window_bits: bits,
                        ..DeflateConfig::default()
                    };
                    for offer in [
                        "permessage-deflate",
                        "permessage-deflate; server_max_window_bits=9",
                    ] {
                        let (_, answer) = params_of(&[offer], &config).unwrap();
                        assert!(!answer.contains("client_max_window_bits"), "{answer}");
                    }
                }
            }
        }
    }
}
