package auditsink

// RuleConfig is one classification rule of audit.rules.
type RuleConfig struct{}

func (c Config) validateRules() error { return nil }
