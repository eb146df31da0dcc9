//! The simulator backend (being written).
use crate::nf4::Nf4View;
use crate::{Element, Result};

/// Run `nf4_dequant` under the simulator (being written).
pub(crate) fn nf4_dequant<T: Element>(_src: &Nf4View<'_>, _out: &mut [T]) -> Result<()> {
    Err(crate::Error::invalid("sim", "not yet written"))
}
