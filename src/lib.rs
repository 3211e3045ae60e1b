//! lors-lm: train decoder-only language models whose stacked layers share their weights
//! the LORS way (`W_l = W_shared + B_l A_l`).
pub mod data;
