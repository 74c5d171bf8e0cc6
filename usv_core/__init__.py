"""USV core: sparse attention, token merging, step schedules and the policy that spends one budget
over them. Plain torch + triton; never imports comfy."""
