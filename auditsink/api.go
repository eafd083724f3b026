package auditsink

func (c Config) validateAdmin() error { return nil }
