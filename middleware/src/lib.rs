//! redrive's tower layers. Filled in module by module; see the crate README.
