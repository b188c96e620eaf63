module lvo/pause

go 1.22
