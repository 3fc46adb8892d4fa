//! hylo-benches
