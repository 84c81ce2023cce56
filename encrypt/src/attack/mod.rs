//! Attacks on fedee's own EE, to measure what it hides (SECURITY.md, "Measured attacks"; SECURITY.md
//! publishes the figures `fedee ee attack` measures with these functions).
//!
//! Each attack is what an honest-but-curious server can compute from what it is given: the
//! EE model, encrypted inputs, and public data or public base weights. The key holder's keys
//! are used only to *score* the result.

pub mod frequency;
pub mod known_plaintext;
pub mod matching;
