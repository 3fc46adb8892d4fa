//! hylo-models
